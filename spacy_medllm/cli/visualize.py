"""``python -m spacy medllm visualize``: a displaCy span view (nested entities) of a few
predicted documents, as one standalone HTML page."""
import warnings
from pathlib import Path

import spacy
from spacy import displacy
from spacy.cli._util import Arg, Opt
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from .app import medllm_cli
from .predict import predict_docs, read_docs


@medllm_cli.command("visualize", short_help="displaCy span page of a pipeline's predictions")
def visualize_cli(
    # fmt: off
    pipeline: str = Arg(..., help="Pipeline directory or installed package name"),
    input_path: Path = Arg(..., help="Documents whose texts to annotate (.spacy)", exists=True, dir_okay=False),
    output_path: Path = Arg(..., help="Output HTML file", dir_okay=False),
    limit: int = Opt(10, "--limit", "-n", help="Number of documents to show"),
    spans_key: str = Opt(DEFAULT_SPANS_KEY, "--spans-key", "-sk", help="Span group to draw"),
    with_gold: bool = Opt(False, "--with-gold", "-G", help="Show each gold document above its prediction"),
    # fmt: on
):
    """Annotate the first LIMIT texts of INPUT_PATH with PIPELINE and render doc.spans[SPANS_KEY]
    with displaCy's "span" style (overlapping entities stacked), optionally beside the gold."""
    nlp = spacy.load(pipeline)
    gold = read_docs(input_path, nlp, limit)
    shown = []
    for i, (ref, pred) in enumerate(zip(gold, predict_docs(nlp, gold)), start=1):
        if with_gold:
            ref.user_data["title"] = f"{i} gold"
            shown.append(ref)
        pred.user_data["title"] = f"{i} predicted" if with_gold else str(i)
        shown.append(pred)
    with warnings.catch_warnings():  # W117 for every document without spans: they are drawn as plain text
        warnings.filterwarnings("ignore", message=r"\[W117\]")
        html = displacy.render(shown, style="span", page=True, options={"spans_key": spans_key})
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text(html, encoding="utf8")
    msg.good(f"Rendered {len(gold)} documents with {pipeline}", str(output_path))
