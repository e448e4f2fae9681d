"""``python -m spacy medllm predict``: run a pipeline on the texts of a ``.spacy`` file and
save the predicted docs, in the same order, for ``errors`` and ``build-cls-data --mined``."""
from pathlib import Path
from typing import Iterator, List, Optional

import spacy
from spacy.cli._util import Arg, Opt, setup_gpu
from spacy.language import Language
from spacy.tokens import Doc, DocBin
from wasabi import msg

from . import medllm_cli


def read_docs(path: Path, nlp: Language, limit: int = 0) -> List[Doc]:
    """The docs of a ``.spacy`` file (the first ``limit`` when > 0), on ``nlp``'s vocab."""
    docs = list(DocBin().from_disk(path).get_docs(nlp.vocab))
    return docs[:limit] if limit > 0 else docs


def predict_docs(nlp: Language, docs: List[Doc], batch_size: Optional[int] = None) -> Iterator[Doc]:
    """Predictions for the *texts* of ``docs``: the gold annotation never reaches the
    pipeline, and each prediction keeps its input's ``user_data["title"]``."""
    texts = (doc.text for doc in docs)
    for doc, pred in zip(docs, nlp.pipe(texts, batch_size=batch_size)):
        if "title" in doc.user_data:
            pred.user_data["title"] = doc.user_data["title"]
        yield pred


@medllm_cli.command("predict", short_help="Annotate texts with a pipeline and save the docs")
def predict_cli(
    # fmt: off
    pipeline: str = Arg(..., help="Pipeline directory or installed package name"),
    input_path: Path = Arg(..., help="Documents whose texts to annotate (.spacy)", exists=True, dir_okay=False),
    output_path: Path = Arg(..., help="Output .spacy with the predicted doc.spans and doc.ents", dir_okay=False),
    limit: int = Opt(0, "--limit", "-n", help="Annotate only the first N documents (0: all)"),
    batch_size: Optional[int] = Opt(None, "--batch-size", "-b", help="Documents per nlp.pipe batch (default: the pipeline's)"),
    use_gpu: int = Opt(-1, "--gpu-id", "-g", help="GPU ID or -1 for CPU"),
    threads: int = Opt(0, "--threads", "-t", help="CPU threads for the models (0: torch's default)"),
    progress: bool = Opt(True, "--progress/--no-progress", help="Show a progress bar (documents, rate, ETA)"),
    # fmt: on
):
    """Annotate the texts of INPUT_PATH with PIPELINE and write the predicted documents to
    OUTPUT_PATH in the same order, ready for `python -m spacy medllm errors GOLD PRED`."""
    import torch
    from tqdm import tqdm

    setup_gpu(use_gpu)
    if threads > 0:
        torch.set_num_threads(threads)
    nlp = spacy.load(pipeline)
    docs = read_docs(input_path, nlp, limit)
    doc_bin = DocBin(store_user_data=True)  # with the generators' mentions (doc._.llm_mentions)
    for pred in tqdm(predict_docs(nlp, docs, batch_size), total=len(docs), unit="doc", disable=not progress):
        doc_bin.add(pred)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    doc_bin.to_disk(output_path)
    msg.good(f"Annotated {len(doc_bin)} documents with {pipeline}", str(output_path))
    for name, component in nlp.pipeline:
        stats = {k: v for k, v in sorted(getattr(component, "stats", {}).items()) if v}
        if stats:
            msg.info(f"{name}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
