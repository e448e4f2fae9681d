"""``python -m spacy medllm calibrate-cls``: the filter threshold that maximises dev F1."""
from pathlib import Path
from typing import Optional

import spacy
from spacy.cli._util import Arg, Opt
from spacy.tokens import DocBin
from spacy.training import Example
from wasabi import msg

from ..components.cls import calibrate, find_filter
from .app import medllm_cli


@medllm_cli.command("calibrate-cls", short_help="Choose the filter threshold with the best dev F1")
def calibrate_cls_cli(
    # fmt: off
    pipeline: Path = Arg(..., help="Pipeline directory with a medllm_cls component", exists=True, file_okay=False),
    dev_path: Path = Arg(..., help="Gold dev documents (.spacy)", exists=True, dir_okay=False),
    component: Optional[str] = Opt(None, "--component", "-c", help="Name of the filter (default: the only medllm_cls)"),
    output: Optional[Path] = Opt(None, "--output", "-o", help="Save the pipeline with the calibrated threshold here (may be PIPELINE)", file_okay=False),
    progress: bool = Opt(True, "--progress/--no-progress", help="Show a progress bar (dev documents, rate, ETA)"),
    # fmt: on
):
    """Run the dev texts through the pipeline up to the filter, scoring every candidate,
    and print the threshold with the best strict F1 on the filter's span group, with the
    dev P/R/F1 at that threshold and without the filter."""
    nlp = spacy.load(pipeline)
    try:
        flt = find_filter(nlp, component)
    except (KeyError, ValueError) as err:
        msg.fail(str(err), exits=1)
    gold = list(DocBin().from_disk(dev_path).get_docs(nlp.vocab))
    examples = [Example(nlp.make_doc(doc.text), doc) for doc in gold]
    try:
        result = calibrate(nlp, examples, flt.name, progress=progress)
    except ValueError as err:
        msg.fail("Cannot calibrate", str(err), exits=1)
    threshold = result.threshold
    if not result.n_candidates:
        msg.warn(
            f"{flt.name}: the pipeline predicted no span on the {len(examples)} dev docs, so there is "
            f"nothing to calibrate on; the threshold stays {threshold:.4f}"
        )
    else:
        msg.good(f"{flt.name}: threshold {threshold:.4f} (was {flt.threshold:.4f})")
    rows = [
        ("without the filter", *result.unfiltered, result.n_candidates),
        (f"filter at {threshold:.4f}", *result.filtered, result.n_kept),
    ]
    msg.table(
        [(name, f"{100 * p:.2f}", f"{100 * r:.2f}", f"{100 * f:.2f}", n) for name, p, r, f, n in rows],
        header=("dev, strict", "P", "R", "F", "spans"),
        aligns=("l", "r", "r", "r", "r"),
    )
    if output is not None:
        flt.threshold = threshold
        nlp.get_pipe_config(flt.name)["threshold"] = threshold
        nlp.to_disk(output)
        msg.good(f"Saved the pipeline to {output}")
