"""The ``medllm`` command group, added to spaCy's CLI; each command module registers its
command on it."""
import typer
from spacy.cli._util import app

medllm_cli = typer.Typer(name="medllm", help="spacy-medllm: generative medical NER commands", no_args_is_help=True)
app.add_typer(medllm_cli, name="medllm")
