"""Training throughput of ``train-llm``: the hand-written loop it replaced against the
Trainer-based path, side by side, on the embedded tiny model (full fine-tuning, symbol
strategy records of the shipped CMeEE sample, one thread, no evaluation).

The old loop is run from a git revision (``--old-ref``, extracted with ``git archive`` to a
temporary folder and put first on ``PYTHONPATH``), the new one from this tree; each in its
own process, one run each. Tokens: the steps times the mean tokens of a batch (no padding);
the time is the whole ``train_sft`` call (model loading, the steps, the final save).

    python benchmarks/training.py --steps 100 --batch-size 8 --old-ref a6ba78a
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_REF = "a6ba78a"  # the last revision with the hand-written loop


def worker(steps: int, batch_size: int, texts: int, out: Path) -> None:
    """One timed ``train_sft`` run with whichever ``spacy_medllm`` is first on the path."""
    import spacy_medllm
    from spacy_medllm.labels import get_scheme
    from spacy_medllm.llm.loader import ModelSpec
    from spacy_medllm.strategies.symbol import SymbolStrategy
    from spacy_medllm.training.sft import SFTConfig, SFTModel, train_sft
    from spacy_medllm.training.sft_data import read_gold_texts, strategy_records

    strategy = SymbolStrategy(template=str(ROOT / "configs" / "templates" / "symbol_tiny.zh.jinja"))
    records = strategy_records(read_gold_texts(ROOT / "assets" / "cmeee_train.json", limit=texts), strategy, get_scheme("cmeee"))
    config = SFTConfig(
        learning_rate=1e-3, batch_size=batch_size, max_steps=steps, warmup_ratio=0.0, num_threads=1,
        progress_bar=False, log_every=steps, cutoff_len=600,
    )
    model = SFTModel(base=ModelSpec(path="embedded", dtype="float32", attn_implementation="eager"), method="full")
    start = time.perf_counter()
    result = train_sft(model, records, config, out)
    seconds = time.perf_counter() - start
    # every record's length is counted once per epoch; `steps` batches of one epoch were trained on
    n_batches = -(-len(records) // batch_size)
    tokens = result.n_train_tokens * steps / n_batches
    print(json.dumps({"package": str(Path(spacy_medllm.__file__).parent), "seconds": seconds, "tokens": tokens,
                      "tokens_per_s": tokens / seconds, "final_loss": result.final_loss}))


def run(label: str, pythonpath: Path, args, workdir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", str(workdir / label), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--texts", str(args.texts)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workdir)
    if done.returncode != 0:
        raise SystemExit(f"{label} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--texts", type=int, default=100, help="CMeEE sample texts (9 records each)")
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the old loop")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.batch_size, args.texts, args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = tmp / "old.tar"
        subprocess.run(["git", "archive", "-o", str(archive), args.old_ref, "spacy_medllm"], cwd=ROOT, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "old", filter="data")
        rows = [("old loop", args.old_ref, run("old", tmp / "old", args, tmp)),
                ("Trainer", "working tree", run("new", ROOT, args, tmp))]
    print(f"train-llm, embedded tiny model, full fine-tuning, {args.steps} steps of batch {args.batch_size}, 1 thread")
    print(f"{'path':<10} {'code':<14} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'final loss':>10}")
    for name, code, r in rows:
        print(f"{name:<10} {code:<14} {r['tokens']:>8.0f} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.0f} {r['final_loss']:>10.4f}")


if __name__ == "__main__":
    main()
