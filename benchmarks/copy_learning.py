"""How fast a small model learns to copy text it has never seen, by alphabet size.

Trains a randomly initialised tiny Qwen2 on copy records (the symbol strategy's ``原文``
prompt, spacy_medllm.training.copy_data) of random strings drawn from the N most frequent
CMeEE characters, and prints, per N, the answer loss and the share of unseen strings that
free greedy generation copies exactly at each evaluation. The embedded model's copy stage
depends on this: a character-level model has thousands of characters to copy.

    python benchmarks/copy_learning.py                      # alphabets 20, 200, 2000
    python benchmarks/copy_learning.py --alphabets 20 2000 --steps 1800 --hidden 128
"""
import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(alphabet, steps, hidden, layers, seed, workdir):
    import torch

    from spacy_medllm.llm.loader import ModelSpec, clear_cache
    from spacy_medllm.llm.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
    from spacy_medllm.strategies.symbol import SymbolStrategy
    from spacy_medllm.training.copy_data import CopyEvaluator, copy_records
    from spacy_medllm.training.sft import SFTConfig, SFTModel, train_sft
    from spacy_medllm.training.sft_data import GoldText

    torch.set_num_threads(1)
    rng = random.Random(seed)

    def string():
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 12)))

    strategy = SymbolStrategy(str(ROOT / "configs" / "templates" / "symbol_tiny.zh.jinja"))
    tokenizer = build_char_tokenizer("".join(alphabet) + "原文随机：[]")
    config = TinyModelConfig(hidden=hidden, layers=layers, heads=4, kv_heads=2, intermediate=2 * hidden, seed=seed)
    base = workdir / "base"
    build_tiny_model(tokenizer, config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    records = copy_records([GoldText(string(), (), "r") for _ in range(16 * steps)], strategy)
    evaluator = CopyEvaluator([string() for _ in range(50)], strategy)
    settings = SFTConfig(
        learning_rate=2e-3, batch_size=16, max_steps=steps, warmup_ratio=0.02, num_threads=1, progress_bar=False,
        log_every=steps // 6, cutoff_len=128, eval_every=steps // 3, score_key="copy_exact",
    )
    model = SFTModel(base=ModelSpec(path=str(base), dtype="float32", attn_implementation="eager"), method="full")
    result = train_sft(model, records, settings, workdir / "out", evaluate=evaluator)
    clear_cache()
    losses = result.losses
    window = max(1, steps // 6)
    return {
        "loss": [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 3) for i in range(0, steps, window)],
        "copy_exact": {e["step"]: e["eval"]["copy_exact"] for e in result.state.evaluations},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphabets", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cmeee" / "CMeEE_train.json")
    args = parser.parse_args()
    counts = Counter("".join(d["text"] for d in json.loads(args.data.read_text(encoding="utf8"))))
    ranked = [ch for ch, _ in counts.most_common()]
    rows = []
    for n in args.alphabets:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((n, run(ranked[:n], args.steps, args.hidden, args.layers, args.seed, Path(tmp))))
    print(f"tiny Qwen2 (hidden {args.hidden}, {args.layers} layers), batch 16, lr 2e-3, {args.steps} steps, "
          "random strings of 4-12 characters; 50 unseen strings per evaluation")
    print("| alphabet | answer loss by sixth of training | exact copies of unseen strings, by step |")
    print("|---|---|---|")
    for n, row in rows:
        exact = ", ".join(f"{step}: {value:.2f}" for step, value in row["copy_exact"].items())
        print(f"| {n} | {' → '.join(str(x) for x in row['loss'])} | {exact} |")


if __name__ == "__main__":
    main()
