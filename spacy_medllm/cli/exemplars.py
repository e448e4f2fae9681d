"""``python -m spacy medllm exemplars``: representative training entities per type for the
decision prompt of the ensemble's LLM resolver."""
from pathlib import Path
from typing import Optional

from spacy.cli._util import Arg, Opt
from spacy.tokens import DocBin
from spacy.vocab import Vocab
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from ..ensemble.exemplars import collect_entities, lm_embedder, save_exemplars, select_exemplars, tfidf_embedder
from .app import medllm_cli


@medllm_cli.command("exemplars", short_help="Representative entities per type (K-Means) for the decision LLM")
def exemplars_cli(
    # fmt: off
    train_path: Path = Arg(..., help="Training documents (.spacy)", exists=True, dir_okay=False),
    output_path: Path = Arg(..., help="Output JSON file", dir_okay=False),
    per_type: int = Opt(5, "--per-type", "-n", help="Exemplars per entity type"),
    model: Optional[Path] = Opt(None, "--model", "-m", help="Base LLM directory: embed with its mean hidden states (default: character n-gram TF-IDF)", exists=True, file_okay=False),
    spans_key: str = Opt(DEFAULT_SPANS_KEY, "--spans-key", "-sk", help="Span group holding the gold entities (doc.ents where a doc has none)"),
    seed: int = Opt(0, "--seed", help="K-Means seed"),
    batch_size: int = Opt(16, "--batch-size", "-b", help="Entities per forward pass with --model"),
    # fmt: on
):
    """Cluster the unique gold entity texts of each type with K-Means (weighted by
    frequency) and keep the text nearest each centroid. Load the file with
    ``spacy_medllm.Exemplars.v1`` in ``[initialize.components.<ensemble>.exemplars]``."""
    docs = DocBin().from_disk(train_path).get_docs(Vocab())
    pool, skipped = collect_entities(docs, spans_key)
    for reason, n in sorted(skipped.items()):
        msg.warn(f"Skipped {n}: {reason}", str(train_path))
    if not pool:
        msg.fail(f"{train_path} holds no entities in doc.spans[{spans_key!r}] or doc.ents", exits=1)
    if model is None:
        embed, method = tfidf_embedder(), "tfidf"
    else:
        from ..llm.loader import ModelSpec, load_lm

        lm = load_lm(ModelSpec(path=str(model)))
        embed, method = lm_embedder(lm.model, lm.tokenizer, batch_size=batch_size), f"hidden_states:{model}"
    exemplars = select_exemplars(pool, embed, per_type=per_type, seed=seed)
    save_exemplars(
        output_path,
        exemplars,
        per_type=per_type,
        method=method,
        seed=seed,
        unique_entities={label: len(texts) for label, texts in sorted(pool.items())},
    )
    for label, texts in exemplars.items():
        msg.text(f"{label}: {'、'.join(texts)}")
    msg.good(f"Saved exemplars for {len(exemplars)} types", output_path)
