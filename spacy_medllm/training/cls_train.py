"""Training of the LLM-CLS filter and of its encoder baseline on ``build-cls-data`` records.

The optimisation settings are the SFT trainer's (``spacy_medllm.SFTConfig.v1``: learning
rate, batch size, gradient accumulation, epochs / max_steps, warmup, weight decay, gradient
clipping, length buckets, seed, threads, eval_every, log_every, score_key, mixed_precision,
report_to) and so is the loop: the Hugging Face ``Trainer`` with the pieces of
:mod:`.hf_trainer` (length-bucketed epoch batches, dev evaluation writing ``model-best``),
plus the LoRA settings and the model loading for LoRA / QLoRA / full training. Only the
loss differs (cross-entropy of a 2-way head instead of the LM loss). The SFT settings that concern chat records (cutoff_len, overlong,
negative_ratio, token_weights) and checkpoints (save_every, keep_checkpoints) do not apply:
the classifier's ``max_length`` cuts context around the candidate, and a run is short.

Three classifiers, chosen by the ``[model]`` block:

- ``spacy_medllm.LLMClassifier.v1``: a local causal LM (Qwen2, Llama, ...), LoRA / QLoRA
  or full training (the paper's LLM-CLS);
- ``spacy_medllm.TinyLLMClassifier.v1``: a tiny Qwen2/Llama built from the training
  texts (character tokenizer of ``llm.tiny``), trained in full; runs on a CPU in minutes;
- ``spacy_medllm.EncoderClassifier.v1``: a tiny BERT-style encoder of the same kind, with
  ``[CLS]`` pooling (the paper's BERT-CLS baseline).

Output (``output_dir``): ``model-last/`` and ``model-best/`` (classifier directories, see
``llm.cls_head``; best by the dev ``score_key``), ``log.jsonl`` (losses and evaluations).
"""
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import srsly
from spacy.util import registry
from wasabi import msg

from ..embedded import EMBEDDED, resolve_model_path
from ..llm.cls_head import ClassifierSettings, SpanClassifier
from ..llm.loader import ModelSpec
from ..llm.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from .cls_data import ClsRecord
from .sft import LoraSettings, SFTConfig, SFTModel, load_for_training

ClassifierBuilder = Callable[[Sequence[ClsRecord], Dict[str, str], int], SpanClassifier]
METRICS = ("acc", "p", "r", "f", "loss")
# SFT settings without meaning here: a non-default value is reported, not silently ignored
_NOT_APPLICABLE = ("cutoff_len", "overlong", "negative_ratio", "token_weights", "save_every", "keep_checkpoints")
# load_for_training insists on a chat template; the classifier never renders a chat
_NO_CHAT = "{# the LLM-CLS classifier renders no chat #}"


# --------------------------------------------------------------------------- classifiers


@registry.misc("spacy_medllm.LLMClassifier.v1")
def make_llm_classifier(
    base: ModelSpec,
    method: str = "lora",
    lora: LoraSettings = LoraSettings(),
    pooling: str = "marker",
    max_length: int = 256,
    separator: str = "\n",
) -> ClassifierBuilder:
    """A classifier on the causal LM ``base``; ``method``: ``lora``, ``qlora`` (4-bit
    base) or ``full``."""
    local = replace(base, path=str(resolve_model_path(base.path).resolve()))
    sft_model = SFTModel(base=local, method=method, lora=lora, chat_template=_NO_CHAT)
    # saved with the classifier: "embedded" stays portable, any other path is made absolute
    saved_path = base.path if base.path == EMBEDDED else local.path

    def build(records: Sequence[ClsRecord], labels: Dict[str, str], seed: int) -> SpanClassifier:
        model, tokenizer = load_for_training(sft_model, seed)
        settings = ClassifierSettings(
            kind="llm",
            mode="full" if method == "full" else "lora",
            pooling=pooling,
            max_length=max_length,
            separator=separator,
            labels=dict(labels),
            base=None if method == "full" else {**asdict(sft_model.spec), "path": saved_path},
        )
        return SpanClassifier(model, tokenizer, settings)

    return build


def _char_tokenizer(records: Sequence[ClsRecord], labels: Dict[str, str]):
    return build_char_tokenizer("".join(r.text for r in records) + "".join(labels.values()))


@registry.misc("spacy_medllm.TinyLLMClassifier.v1")
def make_tiny_llm_classifier(
    arch: str = "qwen2",
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    pooling: str = "marker",
    max_length: int = 256,
    separator: str = "\n",
) -> ClassifierBuilder:
    """A tiny causal LM (``llm.tiny``) with a character vocabulary of the training texts,
    trained in full."""

    def build(records: Sequence[ClsRecord], labels: Dict[str, str], seed: int) -> SpanClassifier:
        tokenizer = _char_tokenizer(records, labels)
        shape = TinyModelConfig(arch=arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                                intermediate=intermediate, max_positions=max_length + 8, seed=seed)
        model = build_tiny_model(tokenizer, shape)
        settings = ClassifierSettings("llm", "full", pooling, max_length, separator, dict(labels))
        return SpanClassifier(model, tokenizer, settings)

    return build


@registry.misc("spacy_medllm.EncoderClassifier.v1")
def make_encoder_classifier(
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 256,
    pooling: str = "cls",
    max_length: int = 256,
    separator: str = "\n",
    dropout: float = 0.1,
) -> ClassifierBuilder:
    """A tiny BERT-style encoder (``BertModel``, no pooler) with a character vocabulary of
    the training texts plus ``[CLS]``/``[SEP]``, trained in full."""

    def build(records: Sequence[ClsRecord], labels: Dict[str, str], seed: int) -> SpanClassifier:
        import torch
        from transformers import BertConfig, BertModel

        tokenizer = _char_tokenizer(records, labels)
        tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=max_length + 8,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
        settings = ClassifierSettings("encoder", "full", pooling, max_length, separator, dict(labels))
        return SpanClassifier(model, tokenizer, settings)

    return build


# --------------------------------------------------------------------------- evaluation


def evaluate_classifier(
    classifier: SpanClassifier, records: Sequence[ClsRecord], batch_size: int = 32, threshold: float = 0.5
) -> Dict[str, Any]:
    """Accuracy, P/R/F1 of the class "correct", mean cross-entropy, and the accuracy per
    record kind (gold, shift, type, mined) at ``threshold``."""
    probs = classifier.predict_proba([(r.text, r.start, r.end, r.label) for r in records], batch_size)
    tp = fp = fn = right = 0
    loss = 0.0
    by_kind: Dict[str, List[int]] = {}
    for r, p in zip(records, probs):
        pred = p >= threshold
        tp += pred and r.is_correct
        fp += pred and not r.is_correct
        fn += (not pred) and r.is_correct
        right += pred == r.is_correct
        loss -= math.log(max(p if r.is_correct else 1.0 - p, 1e-12))
        counts = by_kind.setdefault(r.kind, [0, 0])
        counts[0] += pred == r.is_correct
        counts[1] += 1
    n = len(records)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "acc": right / n if n else 0.0,
        "p": p,
        "r": r,
        "f": 2 * p * r / (p + r) if p + r else 0.0,
        "loss": loss / n if n else 0.0,
        "acc_by_kind": {k: c[0] / c[1] for k, c in sorted(by_kind.items())},
    }


# --------------------------------------------------------------------------- training


@dataclass
class ClsTrainResult:
    output_dir: Path
    losses: List[float] = field(default_factory=list)
    evaluations: List[Dict[str, Any]] = field(default_factory=list)
    best_step: Optional[int] = None
    best_score: Optional[float] = None
    seconds: float = 0.0
    classifier: Optional[SpanClassifier] = None  # as after the last step (model-last)

    @property
    def model_best(self) -> Path:
        return self.output_dir / "model-best"

    @property
    def model_last(self) -> Path:
        return self.output_dir / "model-last"


def train_classifier(
    build: ClassifierBuilder,
    train: Sequence[ClsRecord],
    dev: Sequence[ClsRecord],
    labels: Dict[str, str],
    config: SFTConfig,
    output_dir: Union[str, Path],
) -> ClsTrainResult:
    """Build the classifier and train it with the ``Trainer`` (cross-entropy of the 2-way
    head), evaluating on ``dev`` after each epoch (and every ``eval_every`` steps) and
    keeping ``model-best`` by ``config.score_key`` (lower is better for ``loss``)."""
    import torch

    from .hf_trainer import (  # the Trainer's imports cost seconds: only when training
        DevEvaluation,
        EpochBatches,
        JsonlLog,
        MedLLMTrainer,
        RunControl,
        check_processes,
        quiet_progress,
        summed_cross_entropy,
        training_arguments,
    )

    start_time = time.perf_counter()
    if not train:
        raise ValueError("No training records were given.")
    if config.score_key not in METRICS:
        raise ValueError(f"score_key={config.score_key!r}: the classifier reports {METRICS}")
    defaults = SFTConfig()
    changed = [f.name for f in fields(SFTConfig) if f.name in _NOT_APPLICABLE and getattr(config, f.name) != getattr(defaults, f.name)]
    if changed:
        msg.warn(f"Training settings without effect on the classifier: {', '.join(changed)}")
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    output_dir = Path(output_dir)
    greater = config.score_key != "loss"
    args = training_arguments(
        config, output_dir / "checkpoints", checkpoints=False,
        metric=f"eval_{config.score_key}" if dev else None, greater_is_better=greater,
    )
    check_processes(args)
    torch.manual_seed(config.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    classifier = build(train, labels, config.seed)
    encoded = [(*classifier.encode(r.text, r.start, r.end, r.label), int(r.is_correct)) for r in train]
    batches = EpochBatches([len(ids) for ids, _, _ in encoded], [False] * len(encoded), replace(config, negative_ratio=1.0),
                           args.world_size, args.process_index)
    steps_per_epoch, total_steps = batches.step_budget()
    n_trainable = sum(p.numel() for p in classifier.trainable_parameters())
    msg.info(
        f"{classifier.settings.kind}/{classifier.settings.mode}: {n_trainable:,} trainable "
        f"parameters, {len(train)} records, {steps_per_epoch} steps per epoch, {total_steps} steps"
    )
    if args.process_index == 0:
        srsly.write_json(
            output_dir / "training_meta.json",
            {"settings": asdict(classifier.settings), "training": asdict(config), "records": len(train),
             "dev_records": len(dev), "processes": args.world_size, "steps_per_epoch": steps_per_epoch,
             "total_steps": total_steps},
        )
    log_path = output_dir / "log.jsonl"
    if log_path.exists():
        log_path.unlink()
    log = JsonlLog(log_path, config.log_every, config.progress_bar)

    def save(trainer, path: Path) -> None:
        if trainer.is_world_process_zero():
            classifier.save(path)

    def collate(items):
        return {**classifier.collate([(ids, pos) for ids, pos, _ in items]),
                "labels": torch.tensor([target for _, _, target in items], dtype=torch.long)}

    def show(scores: Dict[str, Any]) -> str:
        return "dev " + " ".join(f"{k}={scores[k]:.4f}" for k in METRICS) + f" {scores['acc_by_kind']}"

    dev_eval = DevEvaluation(
        output_dir, save, (lambda path: evaluate_classifier(classifier, dev, config.batch_size * 2)) if dev else None,
        config.score_key, greater, log, show,
    )
    trainer = MedLLMTrainer(
        model=classifier, args=args, train_dataset=encoded, data_collator=collate,
        compute_loss_func=summed_cross_entropy,
        callbacks=[RunControl(config.eval_every, config.max_minutes, checkpoints=False), log],
        batches=batches, count=lambda batch: torch.tensor(len(batch["labels"])), dev=dev_eval,
    )
    quiet_progress(trainer, log)
    trainer.train()
    classifier.eval()
    return ClsTrainResult(
        output_dir, losses=log.losses, evaluations=dev_eval.evaluations, best_step=dev_eval.best_step,
        best_score=dev_eval.best_score, seconds=time.perf_counter() - start_time, classifier=classifier,
    )


@registry.readers("spacy_medllm.ClsRecords.v1")
def make_cls_records(path: str) -> List[ClsRecord]:
    """The records of a ``build-cls-data`` JSONL file."""
    from .cls_data import read_cls_records

    return read_cls_records(path)


SECTIONS = ("paths", "labels", "corpora", "model", "training")


def train_from_config(
    config_path: Union[str, Path], output_dir: Optional[Union[str, Path]] = None, overrides: Optional[Dict[str, Any]] = None
) -> ClsTrainResult:
    """Train as a ``configs/train_cls_*.cfg`` config says (sections ``[paths]``,
    ``[labels]``, ``[corpora]`` with ``train`` and ``dev``, ``[model]``, ``[training]``);
    ``output_dir`` falls back to ``[paths] output``. The data is read before the model is
    built, so a wrong path fails fast."""
    from spacy.util import load_config

    from .. import labels as _labels  # noqa: F401  (registers spacy_medllm.LabelScheme.v1)

    config = load_config(Path(config_path), overrides=overrides or {}, interpolate=True)
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"{config_path} lacks the section(s) {missing}; start from configs/train_cls_tiny.cfg.")
    if output_dir is None:
        if not config["paths"].get("output"):
            raise ValueError("No output directory: pass --output DIR or set [paths] output.")
        output_dir = config["paths"]["output"]
    corpora = registry.resolve({"corpora": config["corpora"]})["corpora"]
    if not corpora.get("train"):
        raise ValueError(f"[corpora.train] of {config_path} gave no records.")
    scheme = registry.resolve({"labels": config["labels"]})["labels"]
    build = registry.resolve({"model": config["model"]})["model"]
    training = registry.resolve({"training": config["training"]})["training"]
    if not isinstance(training, SFTConfig):
        raise ValueError("[training] must be a spacy_medllm.SFTConfig.v1 block.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.to_disk(output_dir / "config.cfg")
    labels = {info.code: info.name for info in scheme}
    return train_classifier(build, corpora["train"], corpora.get("dev") or [], labels, training, output_dir)
