"""Hold back a seeded random sample of a ``.spacy`` file: ``HELD`` gets ``--size`` documents,
``REST`` the others; both keep the source order. The per-data-set workflows of project.yml
use it to cut a dev and an unseen test split from the public files."""
import random
from pathlib import Path

import typer
from spacy.tokens import DocBin
from spacy.vocab import Vocab
from wasabi import msg


def main(
    input_path: Path = typer.Argument(..., help="Documents (.spacy)", exists=True, dir_okay=False),
    rest_path: Path = typer.Argument(..., help="Output .spacy for the documents not held back"),
    held_path: Path = typer.Argument(..., help="Output .spacy for the held-back sample"),
    size: int = typer.Option(..., "--size", "-n", help="Documents to hold back"),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed of the sample"),
) -> None:
    doc_bin = DocBin(store_user_data=True).from_disk(input_path)
    docs = list(doc_bin.get_docs(Vocab()))
    if not 0 < size < len(docs):
        msg.fail(f"--size must be between 1 and {len(docs) - 1} for {input_path} ({len(docs)} documents)", exits=1)
    held = set(random.Random(seed).sample(range(len(docs)), size))
    for path, keep in ((rest_path, False), (held_path, True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        DocBin(store_user_data=True, docs=[d for i, d in enumerate(docs) if (i in held) == keep]).to_disk(path)
    msg.good(f"{input_path}: {len(docs) - size} documents to {rest_path}, {size} to {held_path}")


if __name__ == "__main__":
    typer.run(main)
