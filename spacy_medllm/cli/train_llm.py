"""``python -m spacy medllm train-llm``: instruction-tune a generator from a config file."""
from pathlib import Path
from typing import Any, Dict, Optional

import typer
from spacy.cli._util import Arg, Opt, parse_config_overrides
from spacy.util import load_config, registry
from thinc.api import ConfigValidationError
from wasabi import msg

from ..errors import MedLLMLoadError, SFTError
from ..strategies import STRATEGIES  # noqa: F401  (registers the strategies a config names)
from ..training import evaluate as _evaluate  # noqa: F401  (registers spacy_medllm.GenerationEvaluator.v2)
from ..training.sft import SFTConfig, SFTModel, TrainResult, train_sft
from .app import medllm_cli

SECTIONS = ("paths", "model", "corpora", "training")


def train_llm(
    config_path: Path,
    output_dir: Optional[Path] = None,
    overrides: Dict[str, Any] = {},
    resume_from: Optional[Path] = None,
) -> TrainResult:
    """Resolve the config's ``[model]``, ``[corpora.train]``, ``[training]`` and optional
    ``[evaluation]`` blocks and train; ``output_dir`` falls back to ``[paths] output``.
    Data and dev files are read before the model is loaded, so a wrong path fails fast. A
    template named by ``[corpora.train.strategy]`` is saved with the models."""
    config = load_config(config_path, overrides=overrides, interpolate=True)
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise SFTError(f"{config_path} lacks the section(s) {missing}; start from configs/train_llm_tiny.cfg.")
    if output_dir is None:
        output = config["paths"].get("output")
        if not output:
            raise SFTError("No output directory: pass --output DIR or set [paths] output.")
        output_dir = Path(output)
    model_cfg = registry.resolve({"model": config["model"]})["model"]
    records = registry.resolve({"train": config["corpora"]["train"]})["train"]
    training = registry.resolve({"training": config["training"]})["training"]
    if not isinstance(model_cfg, SFTModel) or not isinstance(training, SFTConfig):
        raise SFTError("[model] must be a spacy_medllm.SFTModel.v1 block and [training] a spacy_medllm.SFTConfig.v1 block.")
    evaluate = None
    if config.get("evaluation"):
        evaluate = registry.resolve({"evaluation": config["evaluation"]})["evaluation"]
    template = (config["corpora"]["train"].get("strategy") or {}).get("template")
    output_dir.mkdir(parents=True, exist_ok=True)
    config.to_disk(output_dir / "config.cfg")
    return train_sft(
        model_cfg, records, training, output_dir, evaluate=evaluate, resume_from=resume_from, prompt_template=template
    )


@medllm_cli.command("train-llm", short_help="Fine-tune the generator: full, LoRA or QLoRA", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_llm_cli(
    # fmt: off
    ctx: typer.Context,  # used for the extra arguments: config overrides
    config_path: Path = Arg(..., help="Training config (see configs/train_llm_*.cfg)", dir_okay=False),
    output_dir: Optional[Path] = Opt(None, "--output", "-o", help="Output directory (model-last, model-best, checkpoints); default [paths] output", file_okay=False),
    resume_from: Optional[Path] = Opt(None, "--resume", "-r", help="Resume from OUTPUT/checkpoints/checkpoint-<step>"),
    # fmt: on
):
    """Fine-tune a causal LM on a strategy's instruction data (LoRA, QLoRA or full) with
    the Hugging Face Trainer, with per-epoch dev evaluation keeping the best model. Settings
    can be overridden on the command line with dotted names, e.g. --training.max_steps 10
    --paths.train FILE. Data parallel on several GPUs: accelerate launch -m spacy medllm
    train-llm CONFIG (or torchrun --nproc_per_node N -m spacy medllm train-llm CONFIG).
    """
    if not config_path.exists():
        msg.fail(f"Config file not found: {config_path}", exits=1)
    overrides = parse_config_overrides(ctx.args)
    try:
        result = train_llm(config_path, output_dir, overrides, resume_from)
    except (SFTError, MedLLMLoadError, FileNotFoundError, ConfigValidationError) as err:
        msg.fail("Training cannot start", str(err), exits=1)
    best = result.state.best_score
    msg.good(
        f"Trained {result.state.step} steps in {result.seconds:.0f}s; final loss "
        f"{result.final_loss:.4f}" + (f"; best dev score {best:.4f} at step {result.state.best_step}" if best is not None else "")
    )
    msg.info(f"Saved {result.model_last} and {result.model_best}")
