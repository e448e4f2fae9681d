"""``python -m spacy medllm …``: the project's commands, added to spaCy's CLI through the
``spacy_cli`` entry point."""
import typer
from spacy.cli._util import app

medllm_cli = typer.Typer(name="medllm", help="spacy-medllm: generative medical NER commands", no_args_is_help=True)
app.add_typer(medllm_cli, name="medllm")

# Each module registers its command on ``medllm_cli`` when imported.
from . import convert  # noqa: E402,F401
from . import errors  # noqa: E402,F401
from . import exemplars  # noqa: E402,F401
from . import init_tiny  # noqa: E402,F401
from . import build_instructions  # noqa: E402,F401
from . import train_llm  # noqa: E402,F401
from . import build_cls_data  # noqa: E402,F401
from . import train_cls  # noqa: E402,F401
from . import calibrate_cls  # noqa: E402,F401
from . import predict  # noqa: E402,F401
from . import visualize  # noqa: E402,F401
