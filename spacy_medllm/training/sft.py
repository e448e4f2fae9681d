"""Instruction tuning (SFT) of a causal LM on chat-form records: LoRA, QLoRA or full.

A small loop of our own rather than the Hugging Face ``Trainer``: the parts this project
needs to be exactly right (the response-only label mask, per-token loss weights, length
buckets, resuming bit-for-bit, evaluating through our own pipeline, one loader for every
component) are each a few lines here, while with the ``Trainer`` they would be overrides of
its collator, loss, sampler and callbacks whose interplay changes between versions.

Output layout (``output_dir``), spaCy-like::

    model-last/   the weights after the last epoch / step: full weights (safetensors) or a
                  peft adapter, plus the tokenizer; the shared loader reads it as
                  ``ModelSpec(path=model-last)`` (full) or ``ModelSpec(path=base)`` +
                  ``add_adapter(name, model-last)`` (LoRA, QLoRA)
    model-best/   the same for the evaluation with the best score (= model-last when no
                  evaluator is given)
    checkpoints/checkpoint-<step>/   what ``resume_from`` needs: trainable weights,
                  optimizer, scheduler, RNG and trainer state
    log.jsonl     one line per logged step and per evaluation
"""
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import srsly
from spacy.util import registry
from wasabi import msg

from ..errors import SFTError
from ..llm.generation import stop_token_ids
from ..llm.loader import MODEL_TEMPLATE_FILE, ModelSpec, clear_cache, load_lm
from .sft_data import (
    IGNORE_INDEX,
    ChatRecord,
    apply_cutoff,
    collate,
    encode_chat,
    epoch_batches,
    token_weight_vector,
)

METHODS = ("full", "lora", "qlora")
# a run that the wall-clock cap stops before this share of max_steps fails instead of passing
# an undertrained model on to the next step of a workflow
MIN_STEP_SHARE = 0.5
OVERLONG = ("truncate", "skip")
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
    many steps besides those at the end of each epoch and of training. ``score_key``: the
    evaluator figure that decides ``model-best`` (higher is better).
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
) -> SFTConfig:
    return SFTConfig(**{k: v for k, v in locals().items()})


# --------------------------------------------------------------------------- model


def load_for_training(model_cfg: SFTModel, seed: int):
    """The model to train (peft-wrapped for LoRA/QLoRA) and its tokenizer.

    The model is taken out of the loader's cache: training changes it in place, and an
    evaluator loading the same base must get a fresh copy.
    """
    import torch

    lm = load_lm(model_cfg.spec)
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
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing
        )
    elif model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
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


def trainable_state(model) -> Dict[str, Any]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_model(model, tokenizer, path: Path, prompt_template: Optional[Path] = None) -> None:
    """Weights (full, or the peft adapter) and tokenizer in the Hugging Face format, and
    the prompt template the records were built with (``medllm_ner`` prompts with it)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    model.config.use_cache = True
    model.save_pretrained(str(path))
    model.config.use_cache = False
    tokenizer.save_pretrained(str(path))
    if prompt_template is not None:
        shutil.copyfile(prompt_template, path / MODEL_TEMPLATE_FILE)


# --------------------------------------------------------------------------- training


@dataclass
class TrainerState:
    """Where training is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    group_in_epoch: int = 0
    best_score: Optional[float] = None
    best_step: Optional[int] = None
    last_eval_step: Optional[int] = None
    evaluations: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: Path
    state: TrainerState
    n_records: int
    n_train_tokens: int
    cutoff: Dict[str, int]
    seconds: float
    final_loss: Optional[float]
    losses: List[float] = field(default_factory=list)

    @property
    def model_last(self) -> Path:
        return self.output_dir / "model-last"

    @property
    def model_best(self) -> Path:
        return self.output_dir / "model-best"


def train_sft(
    model_cfg: SFTModel,
    records: Sequence[ChatRecord],
    config: SFTConfig,
    output_dir: Union[str, Path],
    evaluate: Optional[Evaluator] = None,
    resume_from: Optional[Union[str, Path]] = None,
    prompt_template: Optional[Union[str, Path]] = None,
) -> TrainResult:
    """Fine-tune ``model_cfg`` on ``records``; see the module docstring for what is saved.

    ``evaluate(model_dir) -> dict`` is called with ``model-last`` at the end of each epoch
    (or every ``eval_every`` steps) and at the end; its ``config.score_key`` figure picks
    ``model-best``. ``resume_from``: a ``checkpoints/checkpoint-<step>`` directory of an
    earlier run with the same data and settings. ``prompt_template``: the strategy template
    file the records were built with, saved with every model.
    """
    import torch
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the log
    start_time = time.perf_counter()
    output_dir = Path(output_dir)
    if prompt_template is not None and not Path(prompt_template).is_file():
        raise SFTError(f"Prompt template {prompt_template} does not exist.")
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    if not records:
        raise SFTError("No training records were given.")
    if config.negative_ratio < 1.0 and any(r.n_entities is None for r in records):
        raise SFTError(
            "negative_ratio < 1 needs each record's entity count (\"n_entities\" or "
            "\"meta.n_entities\"), which these records lack; rebuild them with build-instructions "
            "or set negative_ratio = 1.0."
        )
    model, tokenizer = load_for_training(model_cfg, config.seed)
    device = next(p for p in model.parameters()).device
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
    negatives = [e.n_entities == 0 for e in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    vocab_size = model.get_output_embeddings().weight.shape[0]
    weights = token_weight_vector(tokenizer, dict(config.token_weights), vocab_size).to(device)

    n_batches = len(_batches(lengths, negatives, config, 0))
    steps_per_epoch = math.ceil(n_batches / config.grad_accum)
    total_steps = config.max_steps if config.max_steps > 0 else config.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(round(config.warmup_ratio * total_steps)), total_steps
    )
    state = TrainerState()
    if resume_from is not None:
        state = _load_checkpoint(Path(resume_from), model, optimizer, scheduler, config, total_steps)
        msg.info(f"Resumed from {resume_from} at step {state.step}")
    output_dir.mkdir(parents=True, exist_ok=True)
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
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        },
    )
    n_trainable = sum(p.numel() for p in params)
    msg.info(
        f"{model_cfg.method}: {n_trainable:,} trainable parameters, {len(encoded)} records, "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps"
    )
    log_file = (output_dir / "log.jsonl").open("a", encoding="utf8")
    model.train()
    losses: List[float] = []
    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, disable=not config.progress_bar, dynamic_ncols=True, unit="step")

    def log(entry: Dict[str, Any]) -> None:
        log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        log_file.flush()

    def run_evaluation() -> None:
        save_model(model, tokenizer, output_dir / "model-last", prompt_template)
        scores: Dict[str, Any] = {}
        if evaluate is not None:
            model.eval()
            scores = dict(evaluate(output_dir / "model-last"))
            model.train()
        score = scores.get(config.score_key)
        if evaluate is None or (
            isinstance(score, (int, float)) and (state.best_score is None or score > state.best_score)
        ):
            state.best_score = float(score) if isinstance(score, (int, float)) else None
            state.best_step = state.step
            best = output_dir / "model-best"
            if best.exists():
                shutil.rmtree(best)
            shutil.copytree(output_dir / "model-last", best)
        state.last_eval_step = state.step
        entry = {"step": state.step, "epoch": state.epoch, "eval": _plain(scores), "best_step": state.best_step}
        state.evaluations.append(entry)
        log(entry)
        if evaluate is not None:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float))
            bar.write(f"step {state.step} epoch {state.epoch}: {shown}")

    done = state.step >= total_steps
    while not done:
        batches = _batches(lengths, negatives, config, state.epoch)
        groups = [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
        for g in range(state.group_in_epoch, len(groups)):
            loss, n_tokens = _train_step(model, optimizer, scheduler, groups[g], encoded, weights, pad_id, config, device)
            state.step += 1
            state.group_in_epoch = g + 1
            losses.append(loss)
            window_loss.append(loss)
            window_tokens += n_tokens
            elapsed = time.perf_counter() - window_start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{window_tokens / max(elapsed, 1e-9):.0f}", refresh=False)
            if state.step % config.log_every == 0 or state.step == total_steps:
                entry = {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": sum(window_loss) / len(window_loss),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "elapsed_s": time.perf_counter() - start_time,
                }
                log(entry)
                if not config.progress_bar:
                    msg.text(
                        f"step {entry['step']}/{total_steps} epoch {entry['epoch']} loss {entry['loss']:.4f} "
                        f"lr {entry['lr']:.2e} {entry['tokens_per_s']:.0f} tok/s {entry['elapsed_s']:.0f}s"
                    )
                window_loss, window_tokens, window_start = [], 0, time.perf_counter()
            out_of_time = config.max_minutes > 0 and time.perf_counter() - start_time > 60 * config.max_minutes
            if state.step >= total_steps or out_of_time:
                if out_of_time and state.step < total_steps:
                    msg.warn(f"Stopping at step {state.step} of {total_steps}: max_minutes={config.max_minutes} reached")
                done = True
                if state.group_in_epoch == len(groups):
                    state.epoch += 1
                    state.group_in_epoch = 0
                break
            if config.eval_every and state.step % config.eval_every == 0:
                run_evaluation()
            if config.save_every and state.step % config.save_every == 0:
                _save_checkpoint(output_dir, model, optimizer, scheduler, state, config, total_steps)
        else:
            state.epoch += 1
            state.group_in_epoch = 0
            if not config.eval_every:
                run_evaluation()
            _save_checkpoint(output_dir, model, optimizer, scheduler, state, config, total_steps)
            continue
    bar.close()
    if state.last_eval_step != state.step:
        run_evaluation()
        _save_checkpoint(output_dir, model, optimizer, scheduler, state, config, total_steps)
    log_file.close()
    if state.step < MIN_STEP_SHARE * total_steps:
        raise SFTError(
            f"Training stopped at step {state.step} of {total_steps} (max_minutes={config.max_minutes}): the model in "
            f"{output_dir} had under {MIN_STEP_SHARE:.0%} of its step budget and is not usable as a result. Resume it "
            f"with --resume {output_dir}/checkpoints/checkpoint-{state.step}, or set max_steps to what the time allows."
        )
    return TrainResult(
        output_dir=output_dir,
        state=state,
        n_records=len(encoded),
        n_train_tokens=sum(lengths),
        cutoff=cutoff,
        seconds=time.perf_counter() - start_time,
        final_loss=losses[-1] if losses else None,
        losses=losses,
    )


def _batches(lengths: Sequence[int], negatives: Sequence[bool], config: SFTConfig, epoch: int) -> List[List[int]]:
    return epoch_batches(
        lengths, negatives, batch_size=config.batch_size, bucket_batches=config.bucket_batches,
        negative_ratio=config.negative_ratio, seed=config.seed, epoch=epoch,
    )


def _train_step(model, optimizer, scheduler, group, encoded, weights, pad_id, config, device) -> Tuple[float, int]:
    """One optimizer update over the micro-batches of ``group``; the loss is the weighted
    mean over every answer token of the group, whatever the micro-batch split."""
    import torch
    import torch.nn.functional as F

    micro = [collate([encoded[i] for i in batch], pad_id) for batch in group]
    total_weight = float(sum(_target_weights(labels, weights.cpu()).sum() for _, _, labels in micro))
    loss_sum, n_tokens = 0.0, 0
    for ids, mask, labels in micro:
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        loss = (ce * _target_weights(labels, weights).reshape(-1)).sum() / total_weight
        loss.backward()
        loss_sum += float(loss.detach())
        n_tokens += int(mask.sum())
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens


def _target_weights(labels, weights):
    """Loss weight of each next-token target (0 on prompt and padding positions)."""
    target = labels[:, 1:]
    return weights[target.clamp(min=0)] * (target != IGNORE_INDEX)


# --------------------------------------------------------------------------- checkpoints

_RESUME_KEYS = ("learning_rate", "batch_size", "grad_accum", "seed", "negative_ratio", "cutoff_len", "bucket_batches")


def _save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: TrainerState, config: SFTConfig, total_steps: int) -> Path:
    import torch
    from safetensors.torch import save_file

    root = output_dir / "checkpoints"
    path = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    srsly.write_json(
        tmp / "trainer_state.json",
        {"state": _plain(asdict(state)), "config": _plain(asdict(config)), "total_steps": total_steps},
    )
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    kept = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for old in kept[: -config.keep_checkpoints]:
        shutil.rmtree(old)
    return path


def _load_checkpoint(path: Path, model, optimizer, scheduler, config: SFTConfig, total_steps: int) -> TrainerState:
    import torch
    from safetensors.torch import load_file

    if not (path / "trainer_state.json").exists():
        raise SFTError(
            f"{path} is not a training checkpoint (no trainer_state.json); point resume_from at "
            "OUTPUT_DIR/checkpoints/checkpoint-<step>."
        )
    saved = srsly.read_json(path / "trainer_state.json")
    changed = [k for k in _RESUME_KEYS if saved["config"].get(k) != getattr(config, k)]
    if saved["total_steps"] != total_steps:
        changed.append("total steps (epochs / max_steps)")
    if changed:
        msg.warn(f"Resuming with changed settings ({', '.join(changed)}): the run will not match an uninterrupted one")
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise SFTError(f"The checkpoint at {path} does not fit this model (e.g. {missing[0]!r}); was it trained with another method or base?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    s = saved["state"]
    return TrainerState(**s)


def _plain(value: Any) -> Any:
    """JSON-safe copy (tuples to lists, non-finite floats kept as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


__all__ = [
    "METHODS", "OVERLONG", "Evaluator", "LoraSettings", "SFTModel", "SFTConfig", "load_for_training",
    "save_model", "TrainerState", "TrainResult", "train_sft",
]
