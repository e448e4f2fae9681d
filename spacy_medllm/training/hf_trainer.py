"""The pieces of ``train-llm`` and ``train-cls`` that are ours, plugged into the Hugging
Face ``Trainer``: the epoch's batches (length buckets, negative sampling per epoch, one
global batch split across processes), the loss normaliser of a whole optimizer step across
micro-batches and processes (weighted answer tokens, or records), the dev evaluation
through our own pipeline that writes ``model-last`` / ``model-best``, when to evaluate and
stop, and the ``log.jsonl`` log. Everything else (optimizer, schedule, mixed precision,
gradient accumulation, data parallelism / FSDP / DeepSpeed through accelerate, checkpoints
and resuming, ``report_to``) is the ``Trainer``'s.
"""
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from wasabi import msg

from ..errors import SFTError
from .sft_data import IGNORE_INDEX, epoch_batches

def training_arguments(config, checkpoint_dir: Path, *, checkpoints: bool, metric: Optional[str], greater_is_better: bool = True) -> TrainingArguments:
    """``TrainingArguments`` from an :class:`~.sft.SFTConfig`. Evaluation is driven by
    :class:`RunControl` (``eval_strategy="no"``); the loss is logged every step so
    :class:`JsonlLog` sees each step's loss, and written in windows of ``log_every``."""
    import torch

    # several CPU processes (torchrun on a machine without an accelerator) are data
    # parallel only with use_cpu, over gloo
    cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="no",
        save_strategy=("steps" if config.save_every else "epoch") if checkpoints else "no",
        save_steps=max(config.save_every, 1),
        save_total_limit=config.keep_checkpoints,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        seed=config.seed,
        bf16=config.mixed_precision == "bf16",
        fp16=config.mixed_precision == "fp16",
        report_to=[] if config.report_to == "none" else [config.report_to],
        disable_tqdm=not config.progress_bar,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
    )


class EpochBatches:
    """Batch sampler: the batches of :func:`~.sft_data.epoch_batches` for the current
    epoch, drawn with the *global* batch size (``batch_size`` x processes) so that every
    process count sees the same global batches; each process takes its contiguous share.
    A global batch smaller than the process count is left out."""

    def __init__(self, lengths: Sequence[int], negatives: Sequence[bool], config, num_processes: int = 1, process_index: int = 0):
        self.lengths, self.negatives, self.config = list(lengths), list(negatives), config
        self.num_processes, self.process_index, self.epoch = num_processes, process_index, 0
        self._len = len(self._global(0))

    def _global(self, epoch: int) -> List[List[int]]:
        batches = epoch_batches(
            self.lengths, self.negatives, batch_size=self.config.batch_size * self.num_processes,
            bucket_batches=self.config.bucket_batches, negative_ratio=self.config.negative_ratio,
            seed=self.config.seed, epoch=epoch,
        )
        return [b for b in batches if len(b) >= self.num_processes]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def step_budget(self) -> Tuple[int, int]:
        """(optimizer steps per epoch, steps of the whole run): ``max_steps`` when set, else
        ``epochs`` epochs."""
        per_epoch = math.ceil(self._len / self.config.grad_accum)
        return per_epoch, self.config.max_steps if self.config.max_steps > 0 else self.config.epochs * per_epoch

    def __iter__(self):
        n, r = self.num_processes, self.process_index
        for batch in self._global(self.epoch):
            size, extra = divmod(len(batch), n)
            lo = r * size + min(r, extra)
            yield batch[lo : lo + size + (r < extra)]


def answer_weights(labels, weights):
    """Loss weight of each next-token target (0 on prompt and padding positions)."""
    target = labels[:, 1:]
    return weights.to(target.device)[target.clamp(min=0)] * (target != IGNORE_INDEX)


def weighted_lm_loss(weights) -> Callable:
    """``compute_loss_func``: the per-token weighted cross-entropy of the answer tokens,
    summed and divided by the step's total weight (``num_items_in_batch``, see
    :meth:`MedLLMTrainer.get_batch_samples`): the weighted mean over every answer token of
    the optimizer step, whatever the micro-batch and process split."""
    import torch.nn.functional as F

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return (ce * answer_weights(labels, weights).reshape(-1)).sum() / num_items_in_batch

    return loss


def summed_cross_entropy(logits, labels, num_items_in_batch=None):
    """``compute_loss_func`` of the classifier: cross-entropy summed over the micro-batch
    and divided by the records of the whole optimizer step."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels, reduction="sum") / num_items_in_batch


class DevEvaluation:
    """Writes ``model-last`` and scores it with our evaluator; ``model-best`` is a copy of
    the ``model-last`` with the best ``score_key`` (every one when there is no evaluator)."""

    def __init__(self, output_dir: Path, save: Callable[[Trainer, Path], None], evaluate: Optional[Callable[[Path], Dict[str, Any]]],
                 score_key: str, greater_is_better: bool, log: "JsonlLog", show: Callable[[Dict[str, Any]], str]):
        self.output_dir, self.save, self.evaluate, self.score_key = output_dir, save, evaluate, score_key
        self.greater_is_better, self.log, self.show = greater_is_better, log, show
        self.evaluations: List[Dict[str, Any]] = []
        self.best_step: Optional[int] = None
        self.best_score: Optional[float] = None

    def __call__(self, trainer: Trainer) -> Dict[str, Any]:
        last, best = self.output_dir / "model-last", self.output_dir / "model-best"
        self.save(trainer, last)
        scores: Dict[str, Any] = {}
        if trainer.is_world_process_zero():
            if self.evaluate is not None:
                trainer.model.eval()
                scores = dict(self.evaluate(last))
                trainer.model.train()
            score = scores.get(self.score_key)
            previous = trainer.state.best_metric
            numeric = isinstance(score, (int, float))
            better = numeric and (previous is None or (score > previous if self.greater_is_better else score < previous))
            if self.evaluate is None or better:
                self.best_step = trainer.state.global_step
                self.best_score = float(score) if isinstance(score, (int, float)) else None
                if best.exists():
                    shutil.rmtree(best)
                shutil.copytree(last, best)
            entry = {"step": trainer.state.global_step, "epoch": round(trainer.state.epoch or 0.0, 4),
                     "eval": plain(scores), "best_step": self.best_step}
            self.evaluations.append(entry)
            self.log.write(entry)
            if scores:
                self.log.say(f"step {entry['step']} epoch {entry['epoch']:.2f}: {self.show(scores)}")
        if trainer.args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            scores = broadcast_object_list([scores])[0]
        return scores


class MedLLMTrainer(Trainer):
    """The ``Trainer`` with our batches, step normaliser and dev evaluation.

    ``batches``: an :class:`EpochBatches` (rank-aware, so accelerate's sharding of it is
    turned off); ``count(batch)``: a micro-batch's share of the step's loss normaliser;
    ``dev``: a :class:`DevEvaluation`."""

    def __init__(self, *args, batches: EpochBatches, count: Callable, dev: DevEvaluation, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.count, self.dev = batches, count, dev

    def get_train_dataloader(self):
        import torch
        from torch.utils.data import DataLoader

        pin = self.args.dataloader_pin_memory and torch.cuda.is_available()
        loader = self.accelerator.prepare(
            DataLoader(self.train_dataset, batch_sampler=self.batches, collate_fn=self.data_collator, pin_memory=pin)
        )
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is self.batches:
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        import torch

        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if not batch_samples:
            return batch_samples, None
        total = sum(self.count(b) for b in batch_samples).detach().float().to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return batch_samples, torch.clamp(total, min=1e-8)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        scores = self.dev(self)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if metrics:
            self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


class RunControl(TrainerCallback):
    """When to evaluate (every ``eval_every`` steps, else at each epoch end; always at the
    last step) and to stop early (``max_minutes``); a checkpoint at each evaluation."""

    def __init__(self, eval_every: int, max_minutes: float, checkpoints: bool):
        self.eval_every, self.max_minutes, self.checkpoints = eval_every, max_minutes, checkpoints
        self.start = time.perf_counter()
        self.out_of_time = False
        self.saved_step = -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step

    def _evaluate(self, control) -> None:
        control.should_evaluate = True
        control.should_save = control.should_save or self.checkpoints

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps
        self.out_of_time = self.max_minutes > 0 and time.perf_counter() - self.start > 60 * self.max_minutes
        if self.out_of_time and not last:
            msg.warn(f"Stopping at step {state.global_step} of {state.max_steps}: max_minutes={self.max_minutes} reached")
            control.should_training_stop = True
        if last or self.out_of_time or (self.eval_every and state.global_step % self.eval_every == 0):
            self._evaluate(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and not self.out_of_time:
            if not self.eval_every:
                self._evaluate(control)
            control.should_save = control.should_save or (self.checkpoints and self.saved_step != state.global_step)


class JsonlLog(TrainerCallback):
    """``log.jsonl``: the mean loss, learning rate and tokens/s of every ``log_every``
    steps (each step's loss is kept in ``losses``), and the evaluations; the same lines
    on the console when there is no progress bar."""

    def __init__(self, path: Path, log_every: int, progress_bar: bool):
        self.path, self.log_every, self.progress_bar = path, log_every, progress_bar
        self.losses: List[float] = []
        self.window: List[float] = []
        self.start = self.window_start = time.perf_counter()
        self.tokens_at_window = 0
        self.bar_writer: Optional[Callable[[str], None]] = None

    def write(self, entry: Dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def say(self, text: str) -> None:
        (self.bar_writer or msg.text)(text)

    def on_train_begin(self, args, state, control, **kwargs):
        self.window_start = time.perf_counter()
        self.tokens_at_window = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        self.losses.append(float(logs["loss"]))
        self.window.append(float(logs["loss"]))
        if state.global_step % self.log_every and state.global_step < state.max_steps:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen - self.tokens_at_window
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "loss": sum(self.window) / len(self.window),
                 "lr": logs.get("learning_rate"), "tokens_per_s": tokens / max(now - self.window_start, 1e-9),
                 "elapsed_s": now - self.start}
        self.write(entry)
        if not self.progress_bar:
            self.say(f"step {entry['step']}/{state.max_steps} epoch {entry['epoch']:.2f} loss {entry['loss']:.4f} "
                     f"lr {entry['lr'] or 0:.2e} {entry['tokens_per_s']:.0f} tok/s {entry['elapsed_s']:.0f}s")
        self.window, self.window_start, self.tokens_at_window = [], now, state.num_input_tokens_seen


class StepProgress(ProgressCallback):
    """The ``Trainer``'s progress bar without a printed line per logged step (the loss is
    logged every step; :class:`JsonlLog` writes it in windows)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


def quiet_progress(trainer: Trainer, log: JsonlLog) -> None:
    """Swap the ``Trainer``'s per-log printing for :class:`StepProgress`."""
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        progress = StepProgress()
        trainer.add_callback(progress)
        log.bar_writer = lambda text: progress.training_bar.write(text) if progress.training_bar is not None else msg.text(text)


def check_processes(args: TrainingArguments) -> None:
    """One process driving several GPUs would be ``torch.nn.DataParallel``; we split the
    batch per process instead, so several GPUs need one process each."""
    if args.n_gpu > 1:
        raise SFTError(
            f"{args.n_gpu} GPUs are visible to one process: launch with `accelerate launch -m spacy medllm ...` or "
            "`torchrun --nproc_per_node N -m spacy medllm ...` (one process per GPU), or set CUDA_VISIBLE_DEVICES."
        )


def plain(value: Any) -> Any:
    """JSON-safe copy (tuples to lists, non-finite floats kept as strings)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
