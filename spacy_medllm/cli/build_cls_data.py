"""``python -m spacy medllm build-cls-data``: training records for the LLM-CLS filter."""
from collections import Counter
from pathlib import Path
from typing import Optional

from spacy.cli._util import Arg, Opt
from spacy.tokens import DocBin
from spacy.vocab import Vocab
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from ..labels import get_scheme
from ..training.cls_data import KINDS, build_cls_data, write_cls_records
from .app import medllm_cli

PROBLEMS = {
    "empty_gold": "empty gold spans skipped",
    "docs_without_spans_key": "documents without the span group skipped",
    "mined_text_mismatch": "predicted documents whose text differs from the gold one (not mined)",
    "mined_doc_count_mismatch": "documents without a counterpart in the other file",
}


@medllm_cli.command("build-cls-data", short_help="Records for the LLM-CLS filter: gold entities and negatives")
def build_cls_data_cli(
    # fmt: off
    input_path: Path = Arg(..., help="Gold documents (.spacy) with entities in doc.spans[spans_key]", exists=True, dir_okay=False),
    output_path: Path = Arg(..., help="Output JSONL file", dir_okay=False),
    size: int = Opt(10000, "--size", "-n", help="Number of records (positives + negatives)"),
    seed: int = Opt(0, "--seed", "-s", help="Random seed of the sampling"),
    spans_key: str = Opt(DEFAULT_SPANS_KEY, "--spans-key", "-sk", help="Span group holding the gold entities"),
    neg_ratio: float = Opt(1.0, "--neg-ratio", "-r", help="Negatives per positive"),
    mined: Optional[Path] = Opt(None, "--mined", "-m", help="A generator's predictions on the same documents (.spacy, same order): its false positives become negatives", exists=True, dir_okay=False),
    labels: Optional[str] = Opt(None, "--labels", "-l", help="Label scheme (builtin name or .json) whose types the type-change negatives use; default: the gold labels"),
    # fmt: on
):
    """Positives are the gold entities; negatives shift a boundary by ±1/±2 characters,
    change the type, or (with --mined) are the generator's own false positives. No
    negative equals a gold entity. Sampled to --size with --neg-ratio, seeded."""
    vocab = Vocab()
    docs = list(DocBin().from_disk(input_path).get_docs(vocab))
    predicted = list(DocBin().from_disk(mined).get_docs(vocab)) if mined is not None else None
    codes = get_scheme(labels).codes if labels is not None else None
    stats: Counter = Counter()
    records = build_cls_data(docs, codes, size, neg_ratio, seed, spans_key, predicted, stats)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    write_cls_records(records, output_path)
    rows = [(k, stats[f"available_{k}"], stats[f"sampled_{k}"]) for k in KINDS]
    msg.table(rows, header=("kind", "available", "sampled"), aligns=("l", "r", "r"))
    if stats["mined_correct"]:
        msg.info(f"{stats['mined_correct']} predicted spans are gold (not negatives)")
    for key in PROBLEMS:
        if stats[key]:
            msg.warn(f"{PROBLEMS[key]}: {stats[key]}")
    if not records:
        msg.fail(f"No records: {input_path} has no entities under doc.spans[{spans_key!r}]", exits=1)
    msg.good(f"Wrote {len(records)} records to {output_path}")
