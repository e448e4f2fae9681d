"""Accuracy side by side: spaCy's own `ner` and the embedded generator pipeline (alone, and
with the LLM-CLS filter when one is given), on the same CMeEE dev sentences, in one run.

spaCy's `ner` (CharTokenizer, no vectors, the default tok2vec) is trained on the full
CMeEE train set for a stated wall-clock budget and cached; the cache is reused when the
train file and the settings are unchanged. Each system is scored in a fresh process (so
its peak memory is its own) with the project's strict scorer: nested (`doc.spans["sc"]`
against the nested gold; spaCy's flat `ner` is scored there through its `doc.ents`, so its
recall is capped by the nesting) and flat (`doc.ents`).

    python benchmarks/accuracy.py                      # spaCy ner (cached) vs the embedded model
    python benchmarks/accuracy.py --filter training/cls_embedded/model-best
    python benchmarks/accuracy.py --spacy-minutes 60 --dev-size 500
    python benchmarks/accuracy.py --dev-start 1000 --dev-size 300 --open-bias 0 -1 -2   # tune open_bias

The dev sentences scored are ``--dev-start`` .. + ``--dev-size`` of CMeEE dev (by default
the last 500, away from the first dev texts the generator's training selects on).
"""
import argparse
import hashlib
import json
import random
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
CHAR_TOKENIZER = {"nlp": {"tokenizer": {"@tokenizers": "spacy_medllm.CharTokenizer.v1"}}}


def gold_docs(path: Path, vocab, start: int = 0, size: int = 0) -> List[Any]:
    """Gold docs of a CMeEE file (nested ``sc`` and flat ``ents``), ``size`` from ``start``."""
    from spacy_medllm.readers import CONVERTERS, read_docs

    docs = list(read_docs(path, CONVERTERS["cmeee"], vocab, spans_key="sc"))
    return docs[start : start + size] if size else docs[start:]


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def train_spacy_ner(train: Path, out: Path, minutes: float, seed: int, threads: int) -> Dict[str, Any]:
    """spaCy's ``ner`` on the train file's flat entities for ``minutes`` of wall time (or
    the cached model when the data and settings are the same); its training record."""
    import spacy
    import torch
    from spacy.training import Example
    from spacy.util import compounding, minibatch, fix_random_seed

    settings = {"train_sha1": file_digest(train), "minutes": minutes, "seed": seed, "spacy": spacy.__version__}
    record_file = out / "training.json"
    if record_file.exists() and json.loads(record_file.read_text())["settings"] == settings:
        print(f"spaCy ner: cached model at {out} (same data and settings)", file=sys.stderr)
        return json.loads(record_file.read_text())
    torch.set_num_threads(threads)
    fix_random_seed(seed)
    nlp = spacy.blank("zh", config=CHAR_TOKENIZER)
    nlp.add_pipe("ner")
    examples = [Example(nlp.make_doc(doc.text), doc) for doc in gold_docs(train, nlp.vocab)]
    optimizer = nlp.initialize(lambda: examples)
    rng = random.Random(seed)
    start, epochs, updates = time.perf_counter(), 0, 0
    deadline = start + minutes * 60
    while time.perf_counter() < deadline:
        rng.shuffle(examples)
        for batch in minibatch(examples, size=compounding(4.0, 32.0, 1.001)):
            nlp.update(batch, drop=0.1, sgd=optimizer)
            updates += 1
            if time.perf_counter() >= deadline:
                break
        else:
            epochs += 1
        print(f"spaCy ner: {epochs} epochs, {updates} updates, {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    nlp.to_disk(out / "model")
    record = {"settings": settings, "epochs": epochs, "updates": updates, "minutes": (time.perf_counter() - start) / 60}
    record_file.write_text(json.dumps(record, indent=2))
    return record


def reset_peak_memory() -> None:
    """Start this process's peak-RSS count afresh (Linux): a spawned worker otherwise starts
    with its parent's, which may hold spaCy's training data."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak resident memory of this process since :func:`reset_peak_memory`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_system(kind: str, target: str, overrides: Dict[str, Any]):
    import spacy
    from spacy.util import load_config, load_model_from_config

    if kind == "spacy":
        return spacy.load(target)
    config = load_config(ROOT / target, overrides=overrides, interpolate=False)
    nlp = load_model_from_config(config, auto_fill=True)
    nlp.initialize()
    return nlp


def score_system(name: str, kind: str, target: str, overrides: Dict[str, Any], dev: Path, start: int, size: int, threads: int) -> Dict[str, Any]:
    """Run one system on the dev sentences in this (fresh) process and score it."""
    import torch
    from spacy.training import Example

    from spacy_medllm.scoring import score_examples

    torch.set_num_threads(threads)
    reset_peak_memory()
    nlp = load_system(kind, target, overrides)
    golds = gold_docs(dev, nlp.vocab, start, size)
    nlp(golds[0].text)  # load the model before the clock starts
    began = time.perf_counter()
    predicted = list(nlp.pipe(doc.text for doc in golds))
    seconds = time.perf_counter() - began
    for doc in predicted:
        if "sc" not in doc.spans:  # a flat NER: its entities are its nested answer too
            doc.spans["sc"] = list(doc.ents)
    scores = score_examples([Example(p, g) for p, g in zip(predicted, golds)], "sc")
    peak_mb = peak_memory_mb()
    keys = ("p", "r", "f")
    return {
        "system": name,
        "nested": {k: scores[f"spans_sc_{k}"] for k in keys},
        "flat": {k: scores[f"ents_{k}"] for k in keys},
        "sentences": len(golds),
        "sent_per_s": len(golds) / seconds,
        "peak_mb": peak_mb,
    }


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--dev-start", type=int, default=4000)
    parser.add_argument("--dev-size", type=int, default=500)
    parser.add_argument("--spacy-minutes", type=float, default=30.0, help="wall-clock budget of spaCy ner's training")
    parser.add_argument("--cache", type=Path, default=ROOT / "training" / "accuracy" / "spacy_ner")
    parser.add_argument("--generator", default="embedded", help="the generator of configs/pipeline_tiny.cfg")
    parser.add_argument("--open-bias", type=float, nargs="+", default=None, help="score the generator at each of these open_bias values (tuning on dev sentences away from the reported ones)")
    parser.add_argument("--filter", default=None, help="a trained LLM-CLS filter: also score configs/pipeline_tiny_cls.cfg")
    parser.add_argument("--threshold", type=float, default=None, help="the filter's calibrated threshold")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the table's figures here")
    args = parser.parse_args(argv)

    train = args.data_dir / "cmeee" / "CMeEE_train.json"
    dev = args.data_dir / "cmeee" / "CMeEE_dev.json"
    for path in (train, dev):
        if not path.exists():
            sys.exit(f"{path} does not exist: point --data-dir at the folder holding cmeee/CMeEE_train.json and CMeEE_dev.json")
    record = train_spacy_ner(train, args.cache, args.spacy_minutes, args.seed, args.threads)
    generator = {"paths.generator": args.generator}
    systems = [
        (f"spaCy ner ({record['minutes']:.0f} min, {record['epochs']} epochs)", "spacy", str(args.cache / "model"), {}),
    ]
    if args.open_bias is None:
        systems.append(("embedded generator", "config", "configs/pipeline_tiny.cfg", generator))
    for bias in args.open_bias or ():
        overrides = {**generator, "components.ner.recognizer.open_bias": bias}
        systems.append((f"embedded generator (open_bias {bias:g})", "config", "configs/pipeline_tiny.cfg", overrides))
    if args.filter:
        overrides = {**generator, "paths.classifier": args.filter}
        if args.threshold is not None:
            overrides["components.cls.threshold"] = args.threshold
        systems.append(("embedded generator + filter", "config", "configs/pipeline_tiny_cls.cfg", overrides))
    rows = []
    for name, kind, target, overrides in systems:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(score_system, name, kind, target, overrides, dev, args.dev_start, args.dev_size, args.threads).result())
        print(f"{name}: done", file=sys.stderr)

    print(f"CMeEE dev sentences {args.dev_start}..{args.dev_start + rows[0]['sentences'] - 1}, strict micro scores (%)")
    print("| system | nested P / R / F | flat P / R / F | sent/s | peak MB |")
    print("|---|---|---|---|---|")
    for row in rows:
        nested = " / ".join(f"{100 * row['nested'][k]:.2f}" for k in ("p", "r", "f"))
        flat = " / ".join(f"{100 * row['flat'][k]:.2f}" for k in ("p", "r", "f"))
        print(f"| {row['system']} | {nested} | {flat} | {row['sent_per_s']:.2f} | {row['peak_mb']:.0f} |")
    best = max(rows[1:], key=lambda r: r["nested"]["f"])
    print(
        f"nested_f_ratio={best['nested']['f'] / max(rows[0]['nested']['f'], 1e-9):.3f} "
        f"generator_nested_f={best['nested']['f']:.4f} spacy_nested_f={rows[0]['nested']['f']:.4f} "
        f"generator_sent_per_s={rows[1]['sent_per_s']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"spacy_training": record, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
