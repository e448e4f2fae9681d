"""``python -m spacy medllm train-cls``: train the LLM-CLS filter (or its encoder baseline)."""
from pathlib import Path
from typing import Optional

import typer
from spacy.cli._util import Arg, Opt, parse_config_overrides
from thinc.api import ConfigValidationError
from wasabi import msg

from ..errors import MedLLMLoadError, SFTError
from ..training.cls_train import train_from_config
from .app import medllm_cli


@medllm_cli.command("train-cls", short_help="Train the LLM-CLS candidate filter", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cls_cli(
    # fmt: off
    ctx: typer.Context,  # used for the extra arguments: config overrides
    config_path: Path = Arg(..., help="Training config (see configs/train_cls_*.cfg)", dir_okay=False),
    output_dir: Optional[Path] = Opt(None, "--output", "-o", help="Output directory (model-last, model-best); default [paths] output", file_okay=False),
    # fmt: on
):
    """Train the candidate classifier on build-cls-data records, with dev accuracy and
    F1 after every epoch, keeping the best as OUTPUT/model-best (the directory the
    medllm_cls component's `model` names). Override settings with dotted names, e.g.
    --training.epochs 1 --paths.train FILE.
    """
    if not config_path.exists():
        msg.fail(f"Config file not found: {config_path}", exits=1)
    overrides = parse_config_overrides(ctx.args)
    try:
        result = train_from_config(config_path, output_dir, overrides)
    except (SFTError, MedLLMLoadError, ValueError, FileNotFoundError, ConfigValidationError) as err:
        msg.fail("Training cannot start", str(err), exits=1)
    msg.good(
        f"Trained {len(result.losses)} steps in {result.seconds:.0f}s; final loss {result.losses[-1]:.4f}"
        + (f"; best dev score {result.best_score:.4f} at step {result.best_step}" if result.best_score is not None else "")
    )
    msg.info(f"Saved {result.model_last} and {result.model_best}")
