"""Instruction tuning (SFT) of a causal LM on chat-form records: LoRA, QLoRA or full.

The loop is the Hugging Face ``Trainer`` (optimizer, schedule, mixed precision, gradient
accumulation, checkpoints and resuming, ``report_to``, and data parallelism / FSDP /
DeepSpeed when launched with ``accelerate launch`` or ``torchrun``); what is ours is
plugged into it from :mod:`.hf_trainer`: the response-only label mask and per-token loss
weights, the length-bucketed batches with negative sampling per epoch, and the dev
evaluation through our own pipeline that picks ``model-best``.

Output layout (``output_dir``), spaCy-like::

    model-last/   the weights at the last evaluation (= the last step): full weights
                  (safetensors) or a peft adapter, plus the tokenizer and the prompt
                  template; the shared loader reads it as ``ModelSpec(path=model-last)``
                  (full) or ``ModelSpec(path=base)`` + ``add_adapter(name, model-last)``
    model-best/   the same for the evaluation with the best score (= model-last when no
                  evaluator is given)
    checkpoints/checkpoint-<step>/   the ``Trainer``'s checkpoints (model, optimizer,
                  scheduler, RNG, trainer_state.json), what ``resume_from`` needs
    log.jsonl     one line per ``log_every`` steps and per evaluation
"""
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import srsly
from spacy.util import registry
from wasabi import msg

from ..errors import SFTError
from ..llm.generation import stop_token_ids
from ..llm.loader import MODEL_TEMPLATE_FILE, ModelSpec, clear_cache, load_lm
from .sft_data import ChatRecord, apply_cutoff, collate, encode_chat, token_weight_vector

PRECISIONS = ("no", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")

METHODS = ("full", "lora", "qlora")
# a run that the wall-clock cap stops before this share of max_steps fails instead of passing
# an undertrained model on to the next step of a workflow
MIN_STEP_SHARE = 0.5
OVERLONG = ("truncate", "skip")
# non-reentrant activation checkpointing: the variant that works under DistributedDataParallel
NON_REENTRANT = {"use_reentrant": False}
Evaluator = Callable[[Path], Dict[str, Any]]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape. ``target_modules``: peft's ``"all-linear"`` (every linear layer but the
    output head) or a list of module names such as ``["q_proj", "v_proj"]``."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, Tuple[str, ...]] = "all-linear"


@dataclass(frozen=True)
class SFTModel:
    """What to train: the base model (a loader :class:`ModelSpec`) and how.

    ``method``: ``full`` (every weight; for the tiny model), ``lora`` or ``qlora`` (the base
    loaded 4-bit nf4, its compute dtype ``base.bnb_4bit_compute_dtype``).
    ``chat_template``: a Jinja chat template (text, or a path to a file) for a base model
    whose tokenizer has none; it is saved with the output so generation uses the same.
    """

    base: ModelSpec
    method: str = "lora"
    lora: LoraSettings = LoraSettings()
    gradient_checkpointing: bool = False
    chat_template: Optional[str] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SFTError(f"method={self.method!r} is not supported: use one of {METHODS}.")
        if self.method == "qlora" and self.base.quantization == "8bit":
            raise SFTError("method=\"qlora\" trains on a 4-bit base: set quantization = \"4bit\" (or null).")
        if self.method != "qlora" and self.base.quantization is not None:
            raise SFTError(
                f"method={self.method!r} cannot train a {self.base.quantization} quantized base: use "
                "method = \"qlora\", or set quantization = null."
            )

    @property
    def spec(self) -> ModelSpec:
        """The spec the base is loaded with (4-bit nf4 for QLoRA)."""
        if self.method == "qlora":
            return ModelSpec(**{**asdict(self.base), "quantization": "4bit"})
        return self.base


@dataclass(frozen=True)
class SFTConfig:
    """Optimisation settings.

    One *step* is one optimizer update over ``batch_size * grad_accum`` records. Training
    stops after ``epochs`` epochs, or after ``max_steps`` steps when that is > 0; and, when
    ``max_minutes`` > 0, at the first step after that much wall time (the learning-rate
    schedule is not shortened: set max_steps to what the time allows).
    ``cutoff_len``: records longer than this many tokens are truncated (the response is
    cut, so part of it is still learned) or skipped (``overlong``); both are counted.
    ``bucket_batches``: records are shuffled, cut into chunks of that many batches, and
    sorted by length inside a chunk, so a batch holds records of similar length (little
    padding) while the batch order stays random.
    ``negative_ratio``: the share of records without any entity (as the record's
    ``n_entities`` says) kept in each epoch, drawn anew every epoch; 1.0 keeps all.
    ``token_weights``: loss weight for target tokens whose text contains a key, e.g.
    ``{"[": 3.0, "]": 3.0}`` for the symbol strategy's brackets; the loss is the weighted
    mean over response tokens.
    ``eval_every``: evaluate every that many steps instead of at the end of each epoch
    (0); there is always an evaluation at the end. ``save_every``: checkpoints every that
    many steps besides those at each evaluation and epoch end (``keep_checkpoints`` of
    them are kept, and the best). ``score_key``: the evaluator figure that decides
    ``model-best`` (higher is better; the ``Trainer``'s ``metric_for_best_model``).
    ``batch_size`` is per process: with N processes a step sees N x batch_size x
    grad_accum records. ``mixed_precision``: ``no`` (compute in the weights' dtype),
    ``bf16`` or ``fp16`` (autocast). ``report_to``: ``none``, ``tensorboard``, ``wandb`` or
    ``mlflow`` (the ``Trainer``'s integrations; the package must be installed).
    """

    learning_rate: float = 1e-4
    batch_size: int = 6
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int = 0
    max_minutes: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    cutoff_len: int = 256
    overlong: str = "truncate"
    bucket_batches: int = 32
    negative_ratio: float = 1.0
    token_weights: Dict[str, float] = field(default_factory=dict)
    seed: int = 0
    num_threads: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    score_key: str = "f"
    log_every: int = 20
    progress_bar: bool = True
    mixed_precision: str = "no"
    report_to: str = "none"

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG:
            raise SFTError(f"overlong={self.overlong!r} is not supported: use one of {OVERLONG}.")
        if not 0.0 <= self.negative_ratio <= 1.0:
            raise SFTError(f"negative_ratio must be within [0, 1], got {self.negative_ratio}.")
        for name in ("batch_size", "grad_accum", "cutoff_len", "bucket_batches", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise SFTError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.epochs < 1 and self.max_steps < 1:
            raise SFTError("Set epochs or max_steps to at least 1.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise SFTError(f"warmup_ratio must be within [0, 1), got {self.warmup_ratio}.")
        if self.mixed_precision not in PRECISIONS:
            raise SFTError(f"mixed_precision={self.mixed_precision!r} is not supported: use one of {PRECISIONS}.")
        if self.report_to not in REPORT_TO:
            raise SFTError(f"report_to={self.report_to!r} is not supported: use one of {REPORT_TO}.")


@registry.misc("spacy_medllm.LoraSettings.v1")
def make_lora_settings(
    r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Union[str, List[str]] = "all-linear"
) -> LoraSettings:
    if not isinstance(target_modules, str):
        target_modules = tuple(target_modules)
    return LoraSettings(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)


@registry.misc("spacy_medllm.SFTModel.v1")
def make_sft_model(
    base: ModelSpec,
    method: str = "lora",
    lora: LoraSettings = LoraSettings(),
    gradient_checkpointing: bool = False,
    chat_template: Optional[str] = None,
) -> SFTModel:
    return SFTModel(
        base=base, method=method, lora=lora, gradient_checkpointing=gradient_checkpointing, chat_template=chat_template
    )


@registry.misc("spacy_medllm.SFTConfig.v1")
def make_sft_config(
    learning_rate: float = 1e-4,
    batch_size: int = 6,
    grad_accum: int = 1,
    epochs: int = 3,
    max_steps: int = 0,
    max_minutes: float = 0.0,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    cutoff_len: int = 256,
    overlong: str = "truncate",
    bucket_batches: int = 32,
    negative_ratio: float = 1.0,
    token_weights: Dict[str, float] = {},
    seed: int = 0,
    num_threads: int = 0,
    save_every: int = 0,
    keep_checkpoints: int = 2,
    eval_every: int = 0,
    score_key: str = "f",
    log_every: int = 20,
    progress_bar: bool = True,
    mixed_precision: str = "no",
    report_to: str = "none",
) -> SFTConfig:
    return SFTConfig(**{k: v for k, v in locals().items()})


# --------------------------------------------------------------------------- model


def load_for_training(model_cfg: SFTModel, seed: int, device: Optional[str] = None):
    """The model to train (peft-wrapped for LoRA/QLoRA) and its tokenizer.

    ``device``: where a base with ``device = "auto"`` goes (this process's device under
    data parallelism). The model is taken out of the loader's cache: training changes it
    in place, and an evaluator loading the same base must get a fresh copy.
    """
    import torch

    spec = model_cfg.spec
    if device is not None and spec.device == "auto" and spec.device_map is None:
        spec = replace(spec, device=device)
    lm = load_lm(spec)
    clear_cache()
    model, tokenizer = lm.model, lm.tokenizer
    if model_cfg.chat_template is not None:
        template = model_cfg.chat_template
        if "{" not in template and Path(template).exists():
            template = Path(template).read_text(encoding="utf8")
        tokenizer.chat_template = template
    if not getattr(tokenizer, "chat_template", None):
        raise SFTError(
            f"The tokenizer at {model_cfg.base.path} has no chat template, so prompts and answers "
            "cannot be told apart. Set [model] chat_template to a Jinja template (text or file)."
        )
    torch.manual_seed(seed)  # LoRA initialisation
    if model_cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        model.config.use_cache = False
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing, gradient_checkpointing_kwargs=NON_REENTRANT
        )
    elif model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        model.enable_input_require_grads()
    lora = model_cfg.lora
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type="CAUSAL_LM"
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as err:
        raise SFTError(f"LoRA cannot be set up on {model_cfg.base.path}: {err}") from err
    model.config.use_cache = False
    return model, tokenizer


# --------------------------------------------------------------------------- training


@dataclass
class RunState:
    """Where a run ended: its last step, the best dev score and its step, every evaluation."""

    step: int = 0
    best_score: Optional[float] = None
    best_step: Optional[int] = None
    evaluations: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: Path
    state: RunState
    n_records: int
    n_train_tokens: int
    cutoff: Dict[str, int]
    seconds: float
    losses: List[float] = field(default_factory=list)

    @property
    def final_loss(self) -> Optional[float]:
        return self.losses[-1] if self.losses else None

    @property
    def model_last(self) -> Path:
        return self.output_dir / "model-last"

    @property
    def model_best(self) -> Path:
        return self.output_dir / "model-best"


def save_output(trainer, path: Path, prompt_template: Optional[Path]) -> None:
    """The model (full weights or the peft adapter) and tokenizer through the ``Trainer``
    (which gathers FSDP / DeepSpeed shards), saved for generation (``use_cache`` on), and
    the prompt template the records were built with (``medllm_ner`` prompts with it)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero() and path.exists():
        shutil.rmtree(path)
    model.config.use_cache = True
    trainer.save_model(str(path))
    model.config.use_cache = False
    if trainer.is_world_process_zero():
        (path / "training_args.bin").unlink(missing_ok=True)  # a pickle, and no part of the model
        if prompt_template is not None:
            shutil.copyfile(prompt_template, path / MODEL_TEMPLATE_FILE)


def train_sft(
    model_cfg: SFTModel,
    records: Sequence[ChatRecord],
    config: SFTConfig,
    output_dir: Union[str, Path],
    evaluate: Optional[Evaluator] = None,
    resume_from: Optional[Union[str, Path]] = None,
    prompt_template: Optional[Union[str, Path]] = None,
) -> TrainResult:
    """Fine-tune ``model_cfg`` on ``records`` with the ``Trainer``; see the module
    docstring for what is saved. Run it under ``accelerate launch`` or ``torchrun`` for
    data parallelism (each process takes its share of every global batch).

    ``evaluate(model_dir) -> dict`` is called with ``model-last`` at the end of each epoch
    (or every ``eval_every`` steps) and at the end; its ``config.score_key`` figure picks
    ``model-best``. ``resume_from``: a ``checkpoints/checkpoint-<step>`` directory of an
    earlier run with the same data and settings. ``prompt_template``: the strategy template
    file the records were built with, saved with every model.
    """
    import torch
    from transformers.utils import logging as hf_logging

    # imported here: the Trainer's import chain (peft, accelerate, datasets) costs seconds,
    # and every spaCy command loads this module through the CLI entry point
    from .hf_trainer import (
        DevEvaluation,
        EpochBatches,
        JsonlLog,
        MedLLMTrainer,
        RunControl,
        answer_weights,
        check_processes,
        quiet_progress,
        training_arguments,
        weighted_lm_loss,
    )

    hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the log
    start_time = time.perf_counter()
    output_dir = Path(output_dir)
    if prompt_template is not None and not Path(prompt_template).is_file():
        raise SFTError(f"Prompt template {prompt_template} does not exist.")
    if resume_from is not None and not (Path(resume_from) / "trainer_state.json").exists():
        raise SFTError(
            f"{resume_from} is not a training checkpoint (no trainer_state.json); point resume_from at "
            "OUTPUT_DIR/checkpoints/checkpoint-<step>."
        )
    if not records:
        raise SFTError("No training records were given.")
    if config.negative_ratio < 1.0 and any(r.n_entities is None for r in records):
        raise SFTError(
            "negative_ratio < 1 needs each record's entity count (\"n_entities\" or "
            "\"meta.n_entities\"), which these records lack; rebuild them with build-instructions "
            "or set negative_ratio = 1.0."
        )
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    metric = f"eval_{config.score_key}" if evaluate is not None else None
    args = training_arguments(config, output_dir / "checkpoints", checkpoints=True, metric=metric)
    check_processes(args)
    model, tokenizer = load_for_training(model_cfg, config.seed, device=args.device.type if args.device.index is None or args.device.type != "cuda" else str(args.device))
    stops = stop_token_ids(tokenizer, model.generation_config)
    if not stops:
        raise SFTError("The tokenizer defines no EOS or end-of-turn token, so the end of an answer cannot be learned.")
    encoded, cutoff = apply_cutoff(
        [encode_chat(tokenizer, r, stops) for r in records], config.cutoff_len, config.overlong
    )
    if cutoff["skipped"] or cutoff["truncated"]:
        msg.warn(
            f"{cutoff['truncated']} record(s) truncated and {cutoff['skipped']} skipped at cutoff_len="
            f"{config.cutoff_len} tokens ({len(encoded)} of {len(records)} used)"
        )
    if not encoded:
        raise SFTError(f"Every record is longer than cutoff_len={config.cutoff_len}; raise it.")
    lengths = [len(e.input_ids) for e in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    vocab_size = model.get_output_embeddings().weight.shape[0]
    weights = token_weight_vector(tokenizer, dict(config.token_weights), vocab_size).to(args.device)
    batches = EpochBatches(lengths, [e.n_entities == 0 for e in encoded], config, args.world_size, args.process_index)
    output_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch, total_steps = batches.step_budget()
    if args.process_index == 0:
        srsly.write_json(
            output_dir / "training_meta.json",
            {
                "method": model_cfg.method,
                "base": asdict(model_cfg.base),
                "lora": asdict(model_cfg.lora) if model_cfg.method != "full" else None,
                "training": asdict(config),
                "records": len(records),
                "records_used": len(encoded),
                "cutoff": cutoff,
                "processes": args.world_size,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
            },
        )
    log = JsonlLog(output_dir / "log.jsonl", config.log_every, config.progress_bar)
    template = Path(prompt_template) if prompt_template is not None else None
    dev = DevEvaluation(
        output_dir, lambda trainer, path: save_output(trainer, path, template), evaluate, config.score_key, True, log,
        lambda scores: ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float)),
    )
    trainer = MedLLMTrainer(
        model=model, args=args, train_dataset=encoded, data_collator=partial(collate, pad_id=pad_id),
        processing_class=tokenizer, compute_loss_func=weighted_lm_loss(weights),
        callbacks=[RunControl(config.eval_every, config.max_minutes, checkpoints=True), log],
        batches=batches, count=lambda batch: answer_weights(batch["labels"], weights).sum(), dev=dev,
    )
    quiet_progress(trainer, log)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    msg.info(
        f"{model_cfg.method}: {n_trainable:,} trainable parameters, {len(encoded)} records, "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps, {args.world_size} process(es)"
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    step = trainer.state.global_step
    if step < MIN_STEP_SHARE * total_steps:
        raise SFTError(
            f"Training stopped at step {step} of {total_steps} (max_minutes={config.max_minutes}): the model in "
            f"{output_dir} had under {MIN_STEP_SHARE:.0%} of its step budget and is not usable as a result. Resume it "
            f"with --resume {output_dir}/checkpoints/checkpoint-{step}, or set max_steps to what the time allows."
        )
    return TrainResult(
        output_dir=output_dir,
        state=RunState(step, dev.best_score, dev.best_step, dev.evaluations),
        n_records=len(encoded),
        n_train_tokens=sum(lengths),
        cutoff=cutoff,
        seconds=time.perf_counter() - start_time,
        losses=log.losses,
    )


__all__ = [
    "METHODS", "OVERLONG", "Evaluator", "LoraSettings", "SFTModel", "SFTConfig", "load_for_training",
    "RunState", "TrainResult", "train_sft",
]
