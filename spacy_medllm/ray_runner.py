"""``predict --engine ray``: the pending blocks as a Ray Dataset, one row per block,
annotated by ``map_batches`` on a pool of actors that each load the pipeline once.

The driver (where the command runs) reads the input and writes the shards, so only it needs
the files; the actors need the pipeline (a path they can read, or an installed package) and
``spacy-medllm``. An actor annotates a whole block at a time, as ``--engine local`` does, so
the shards are the same bytes whichever engine wrote them. Imported only by that engine, so
Ray stays an optional extra.
"""
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import spacy
from spacy import util

from .errors import CorpusError
from .corpus import (
    Block,
    Record,
    RunSummary,
    Shard,
    annotate,
    make_shard,
    pipeline_stats,
    stats_since,
    write_shard,
)

logger = logging.getLogger("spacy_medllm")

SERVED_MODEL = "spacy_medllm.OpenAIServer.v1"


class Annotator:
    """The ``map_batches`` callable: one pipeline per actor, loaded when the actor starts."""

    def __init__(self, pipeline: str, batch_size: Optional[int]) -> None:
        self.nlp = spacy.load(pipeline)
        self.batch_size = batch_size

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        out: Dict[str, List[Any]] = {"name": [], "docbin": [], "jsonl": [], "documents": [], "stats": []}
        for name, records in zip(batch["name"], batch["records"]):
            records = [Record(*fields) for fields in json.loads(records)]
            before = pipeline_stats(self.nlp)
            shard = make_shard(str(name), records, list(annotate(self.nlp, records, self.batch_size)))
            for key in ("name", "docbin", "jsonl", "documents"):
                out[key].append(getattr(shard, key))
            # the components count in the actor: their counts travel with the shard
            out["stats"].append(json.dumps(stats_since(before, pipeline_stats(self.nlp))))
        return out


def serves_model(pipeline: str) -> bool:
    """Whether the pipeline generates on a served model: its actors then need no GPU."""
    path = Path(pipeline)
    config = util.load_config(path / "config.cfg") if path.is_dir() else spacy.load(pipeline).config
    return SERVED_MODEL in config.to_str()


def run_ray(
    pipeline: str,
    blocks: List[Block],
    folder: Path,
    summary: RunSummary,
    *,
    workers: int,
    gpus_per_worker: float,
    batch_size: Optional[int],
    progress: bool,
) -> None:
    """Annotate ``blocks`` on ``workers`` actors of the Ray cluster at ``RAY_ADDRESS`` (a
    local one, started and stopped here, without it) and write their shards to ``folder``
    as they come back."""
    try:
        import ray
    except ImportError as err:
        raise CorpusError('--engine ray needs Ray: pip install "spacy-medllm[ray]"') from err
    from tqdm import tqdm

    if gpus_per_worker and serves_model(pipeline):
        logger.warning("%s generates on a served model: its actors run on CPUs (--gpus-per-worker ignored)", pipeline)
        gpus_per_worker = 0.0
    if len(blocks) < workers:
        logger.warning("%d blocks for %d workers: a smaller --block-size keeps them all busy", len(blocks), workers)
    if Path(pipeline).exists():  # the actors' working directory is not ours
        pipeline = str(Path(pipeline).resolve())
    rows = [
        {"name": block.name, "records": json.dumps([[r.text, r.origin, r.meta] for r in block.records], ensure_ascii=False)}
        for block in blocks
    ]
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")  # None: a local cluster, for this run only
        ray.init(address=address, **({} if address else {"include_dashboard": False}))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts documents
        shards = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            Annotator,
            fn_constructor_args=(pipeline, batch_size),
            batch_size=1,  # a block at a time, as the local engine annotates
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=gpus_per_worker,
        )
        with tqdm(total=sum(len(b.records) for b in blocks), unit="doc", disable=not progress) as bar:
            for row in shards.iter_rows():
                write_shard(folder, Shard(row["name"], row["docbin"], row["jsonl"], int(row["documents"])))
                summary.documents += int(row["documents"])
                summary.blocks_written += 1
                summary.add_stats(json.loads(row["stats"]))
                bar.update(int(row["documents"]))
    finally:
        if started:
            ray.shutdown()
