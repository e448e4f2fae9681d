"""``python -m spacy medllm predict``: annotate a corpus with a pipeline, in process or on a
Ray cluster, block by block (see :mod:`spacy_medllm.corpus`), resuming where a run stopped.

An OUTPUT ending in ``.spacy`` is one DocBin, in input order, for ``errors`` and
``build-cls-data --mined``; any other OUTPUT is a folder of shards (DocBin + JSONL of
entities per block)."""
import shutil
from pathlib import Path
from typing import Iterator, List, Optional

import spacy
from spacy.cli._util import Arg, Opt, setup_gpu
from spacy.language import Language
from spacy.tokens import Doc, DocBin
from wasabi import msg

from ..errors import CorpusError
from ..corpus import (
    Block,
    RunSummary,
    annotate,
    make_shard,
    merge_shards,
    open_output,
    pipeline_stats,
    read_blocks,
    shard_done,
    stats_since,
    write_shard,
)
from .app import medllm_cli

ENGINES = ("local", "ray")
LISTED_BAD_LINES = 20  # the summary names this many bad lines; the log has them all


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


def predict_corpus(
    pipeline: str,
    input_spec: str,
    output: Path,
    *,
    engine: str = "local",
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    batch_size: Optional[int] = None,
    block_size: int = 1000,
    limit: int = 0,
    progress: bool = True,
) -> RunSummary:
    """Annotate the blocks of ``input_spec`` whose shards are not written yet; a ``.spacy``
    ``output`` is then assembled from the shards (kept in ``OUTPUT.parts`` until then)."""
    if engine not in ENGINES:
        raise CorpusError(f"engine must be one of {ENGINES}, not {engine!r}")
    single = output.suffix == ".spacy"
    folder = output.with_name(output.name + ".parts") if single else output
    open_output(folder, {"block_size": block_size, "limit": limit}, replace=single)
    summary = RunSummary()
    names, pending = [], []
    for block in read_blocks(input_spec, block_size, summary.input, limit):
        names.append(block.name)
        if not shard_done(folder, block.name):
            pending.append(block)
    summary.blocks_skipped = len(names) - len(pending)
    if pending and engine == "local":
        _run_local(pipeline, pending, folder, summary, batch_size, progress)
    elif pending:
        from ..ray_runner import run_ray

        run_ray(pipeline, pending, folder, summary, workers=workers, gpus_per_worker=gpus_per_worker, batch_size=batch_size, progress=progress)
    if single:
        merge_shards(folder, names, output)
        shutil.rmtree(folder)
    return summary


def _run_local(pipeline: str, blocks: List[Block], folder: Path, summary: RunSummary, batch_size: Optional[int], progress: bool) -> None:
    from tqdm import tqdm

    nlp = spacy.load(pipeline)
    before = pipeline_stats(nlp)
    with tqdm(total=sum(len(b.records) for b in blocks), unit="doc", disable=not progress) as bar:
        for block in blocks:
            docs = []
            for doc in annotate(nlp, block.records, batch_size):
                docs.append(doc)
                bar.update(1)
            write_shard(folder, make_shard(block.name, block.records, docs))
            summary.documents += len(docs)
            summary.blocks_written += 1
    summary.add_stats(stats_since(before, pipeline_stats(nlp)))


def print_summary(summary: RunSummary, pipeline: str, output: Path) -> None:
    msg.good(f"Annotated {summary.documents} documents with {pipeline}", str(output))
    msg.info(f"blocks: {summary.blocks_written} written, {summary.blocks_skipped} already written (skipped)")
    for name, counts in summary.stats.items():
        stats = {k: v for k, v in sorted(counts.items()) if v}
        if stats:
            msg.info(f"{name}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    report = summary.input
    if report.blank:
        msg.info(f"{report.blank} blank input lines skipped")
    if report.bad:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(report.bad.items()))
        msg.warn(f"{sum(report.bad.values())} bad input lines skipped ({counts}):")
        for where in report.where[:LISTED_BAD_LINES]:
            print(f"  {where}")
        if len(report.where) > LISTED_BAD_LINES:
            print(f"  ... and {len(report.where) - LISTED_BAD_LINES} more (logged as warnings)")


@medllm_cli.command("predict", short_help="Annotate a corpus with a pipeline, locally or on Ray")
def predict_cli(
    # fmt: off
    pipeline: str = Arg(..., help="Pipeline directory or installed package name"),
    input_spec: str = Arg(..., help="Documents to annotate: a .spacy, .jsonl (a \"text\" field) or text file (one document a line), or a folder or glob of them"),
    output_path: Path = Arg(..., help="A .spacy file (one DocBin, in input order) or a folder of shards (BLOCK.spacy + BLOCK.jsonl of entities)"),
    engine: str = Opt("local", "--engine", "-e", help="local (in this process) or ray (Ray Data; RAY_ADDRESS picks the cluster)"),
    workers: int = Opt(1, "--workers", "-w", help="Ray: pipeline copies (actors) at once"),
    gpus_per_worker: float = Opt(0.0, "--gpus-per-worker", help="Ray: GPUs per actor (0 for a served model)"),
    batch_size: Optional[int] = Opt(None, "--batch-size", "-b", help="Documents per nlp.pipe batch (default: the pipeline's)"),
    block_size: int = Opt(1000, "--block-size", help="Input lines (documents) per block: the unit of output, of resuming and of Ray's scheduling"),
    limit: int = Opt(0, "--limit", "-n", help="Annotate only the first N documents (0: all)"),
    use_gpu: int = Opt(-1, "--gpu-id", "-g", help="local: GPU ID or -1 for CPU"),
    threads: int = Opt(0, "--threads", "-t", help="local: CPU threads for the models (0: torch's default)"),
    progress: bool = Opt(True, "--progress/--no-progress", help="Show a progress bar (documents, rate, ETA)"),
    # fmt: on
):
    """Annotate INPUT_SPEC with PIPELINE, one shard per block of input lines, each written
    whole or not at all: a rerun skips the shards already written. A .spacy OUTPUT_PATH
    holds the predicted documents in input order, ready for `python -m spacy medllm errors
    GOLD PRED`. Bad input lines are skipped, counted and listed with their file:line."""
    import torch

    if engine == "ray" and (use_gpu >= 0 or threads > 0):
        msg.fail("--gpu-id and --threads are for --engine local; Ray places actors with --gpus-per-worker", exits=1)
    setup_gpu(use_gpu)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        summary = predict_corpus(
            pipeline, input_spec, output_path, engine=engine, workers=workers, gpus_per_worker=gpus_per_worker,
            batch_size=batch_size, block_size=block_size, limit=limit, progress=progress,
        )
    except CorpusError as err:
        msg.fail(str(err), exits=1)
    print_summary(summary, pipeline, output_path)
