"""``python -m spacy medllm errors``: scores and the CCL 2025 error taxonomy of a
predicted DocBin against a gold one."""
from pathlib import Path
from typing import Optional

import srsly
from spacy.cli._util import Arg, Opt
from spacy.tokens import DocBin
from spacy.vocab import Vocab
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from ..error_taxonomy import error_taxonomy, render_error_report
from ..scoring import examples_from_docs, flat_view, render_scores, score_examples
from .app import medllm_cli


@medllm_cli.command("errors", short_help="Scores and the error taxonomy of predictions vs gold")
def errors_cli(
    # fmt: off
    gold_path: Path = Arg(..., help="Gold documents (.spacy)", exists=True, dir_okay=False),
    pred_path: Path = Arg(..., help="Predicted documents (.spacy): the same texts in the same order", exists=True, dir_okay=False),
    spans_key: str = Opt(DEFAULT_SPANS_KEY, "--spans-key", "-sk", help="Span group holding the nested entities"),
    pred_key: Optional[str] = Opt(None, "--pred-key", "-pk", help="Predicted span group to score against the gold SPANS_KEY group (default: the same key), e.g. one generator of an ensemble"),
    output: Optional[Path] = Opt(None, "--output", "-o", help="Write scores and every error case as JSON", dir_okay=False),
    # fmt: on
):
    """Print strict, partial, macro and character-BIO P/R/F and the error taxonomy
    (false positives by category, false negatives, boundary length differences) of
    PRED_PATH against GOLD_PATH. Documents are paired by order and must have equal texts.
    ``--pred-key`` scores another predicted span group (e.g. ``sc_a``, one generator of an
    ensemble) against the gold ``--spans-key``; the flat rows always score ``doc.ents``.
    """
    vocab = Vocab()
    gold_docs = list(DocBin().from_disk(gold_path).get_docs(vocab))
    pred_docs = list(DocBin().from_disk(pred_path).get_docs(vocab))
    if pred_key is not None and pred_key != spans_key:
        if not any(pred_key in doc.spans for doc in pred_docs):
            msg.fail(f"No predicted doc has doc.spans[{pred_key!r}]", exits=1)
        for doc in pred_docs:
            doc.spans[spans_key] = list(doc.spans[pred_key]) if pred_key in doc.spans else []
    try:
        examples = examples_from_docs(gold_docs, pred_docs)
    except ValueError as err:
        msg.fail(f"{gold_path} and {pred_path} do not hold the same documents", str(err), exits=1)
    if pred_docs and not any(spans_key in doc.spans for doc in pred_docs):
        msg.warn(f"No predicted doc has doc.spans[{spans_key!r}]: the nested view predicts nothing")
    scores = score_examples(examples, spans_key)
    report = error_taxonomy(examples, spans_key)
    if report.n_skipped:
        msg.warn(
            f"{report.n_skipped} of {len(examples)} gold docs have no doc.spans[{spans_key!r}] and were not scored"
        )
    _, has_ents = flat_view()
    n_flat_skipped = sum(not has_ents(eg.reference) for eg in examples)
    if n_flat_skipped:
        msg.warn(f"{n_flat_skipped} of {len(examples)} gold docs have no doc.ents annotation and were not scored")
    msg.divider("Scores")
    print(render_scores(scores, spans_key))
    msg.divider("Errors")
    print(render_error_report(report))
    if output is not None:
        srsly.write_json(output, {"scores": scores, "errors": report.to_dict()})
        msg.good("Saved scores and errors", output)
