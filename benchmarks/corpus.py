"""Documents per second of `predict` on a corpus: the local engine (one process, torch's
threads on every core) against Ray Data with N single-CPU actors, in one run on the same
documents, the embedded pipeline and the same blocks.

Ray is timed twice from the same run: with the start of its local cluster (what one
`predict --engine ray` costs on a laptop) and without it (what it costs on a running
cluster). Both include starting the actors and loading a pipeline in each, as the local
time includes loading its one.

    python benchmarks/corpus.py                             # 200 CMeEE dev documents, 2 workers
    python benchmarks/corpus.py --docs 400 --workers 4 --block-size 50
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_pipeline(path: Path) -> None:
    import spacy

    nlp = spacy.blank("zh", config={"nlp": {"tokenizer": {"@tokenizers": "spacy_medllm.CharTokenizer.v1"}}})
    nlp.add_pipe("medllm_ner", config={"labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": "cmeee"}})
    nlp.add_pipe("medllm_align")
    nlp.to_disk(path)


def entities(folder: Path) -> list:
    """Every document's (start, end, label) spans, in shard order: what the engines must agree on."""
    lines = (json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text(encoding="utf8").splitlines())
    return [[(s["start"], s["end"], s["label"]) for s in line["spans"]] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="CMeEE dev documents (from the first)")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors")
    parser.add_argument("--block-size", type=int, default=25, help="documents per block (Ray schedules blocks)")
    args = parser.parse_args()

    import ray
    import torch

    from spacy_medllm.cli.predict import predict_corpus

    records = json.loads((ROOT / "assets" / "cmeee_dev.json").read_text(encoding="utf8"))[: args.docs]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, pipeline = work / "in.jsonl", work / "pipeline"
        source.write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in records), encoding="utf8")
        build_pipeline(pipeline)
        run = {"block_size": args.block_size, "progress": False}

        start = time.perf_counter()
        local = predict_corpus(str(pipeline), str(source), work / "local", **run)
        local_s = time.perf_counter() - start

        start = time.perf_counter()
        ray.init(include_dashboard=False)
        ray_start_s = time.perf_counter() - start
        start = time.perf_counter()
        on_ray = predict_corpus(str(pipeline), str(source), work / "ray", engine="ray", workers=args.workers, **run)
        ray_s = time.perf_counter() - start
        ray.shutdown()
        identical = all((work / "local" / p.name).read_bytes() == p.read_bytes() for p in (work / "ray").iterdir())
        same_spans = entities(work / "local") == entities(work / "ray")

    assert local.documents == on_ray.documents == len(records)
    rows = [
        (f"local ({torch.get_num_threads()} torch threads)", local_s),
        (f"ray, {args.workers} workers, cluster start included", ray_start_s + ray_s),
        (f"ray, {args.workers} workers, cluster start excluded", ray_s),
    ]
    print(f"{len(records)} documents, blocks of {args.block_size}, Ray {ray.__version__}; the same spans from "
          f"both engines: {same_spans}; the same bytes: {identical} (scores match to the bit only at equal torch threads)\n")
    print("| engine | docs | seconds | docs/s | ratio to local |")
    print("|---|---:|---:|---:|---:|")
    for engine, seconds in rows:
        print(f"| {engine} | {len(records)} | {seconds:.1f} | {len(records) / seconds:.1f} | {local_s / seconds:.2f} |")


if __name__ == "__main__":
    main()
