"""The LLM-CLS classifier: is ``text[start:end]`` an entity of type ``label``?

Input: the type's display name, a separator, then the sentence with the marker tokens
``<ent>`` / ``</ent>`` around the candidate. A linear head (2 classes) reads the hidden state
of one position of a backbone:

- ``last``: the last token (what transformers' ``*ForSequenceClassification`` pools);
- ``marker``: the closing marker ``</ent>``. In a causal LM the opening marker has not yet
  seen the candidate, the closing one has seen the type, the left context and the whole
  candidate, so it is the marker position that can judge it;
- ``cls``: position 0, for the BERT-style encoder baseline.

Why not ``AutoModelForSequenceClassification``: it loads a second copy of the base (the
generator's ``AutoModelForCausalLM`` from the shared loader cannot be reused), it only
pools the last non-pad token (found through ``pad_token_id``, which is the EOS token on
many checkpoints), and it needs peft's ``SEQ_CLS`` plumbing. A head on the decoder's hidden
states works on the very model ``medllm_ner`` uses, with its own named LoRA adapter.

Why the markers are not added with ``resize_token_embeddings``: on a shared base that would
change the generator's vocabulary (tied embeddings make the markers generable), and with
LoRA the whole resized embedding matrix would have to be saved with the adapter (hundreds
of MB on a 7B model). The tokenizer does get the markers as special tokens; their rows
live in the classifier (``extra_embeddings``, saved with the head), and the backbone is fed
``inputs_embeds``: the markers' ids (the last ids of the tokenizer) are looked up in the
classifier's rows, every other id in the base table.

A saved classifier is a directory::

    cls_config.json     settings (kind, mode, pooling, labels, base model spec, ...)
    head.safetensors    head weights and the marker embeddings
    tokenizer/          the tokenizer with the markers
    adapter/            the LoRA adapter (mode "lora"), or
    model/              the full backbone weights (mode "full": tiny LLM, encoder)
"""
import json
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..safety import check_links
from ..errors import MedLLMLoadError
from .loader import LoadedLM, ModelSpec, default_adapter_name, load_lm
from .peft_model import unwrap_peft

MARKERS = ("<ent>", "</ent>")
KINDS = ("llm", "encoder")
MODES = ("full", "lora")
POOLINGS = ("last", "marker", "cls")
CONFIG_FILE = "cls_config.json"
HEAD_FILE = "head.safetensors"

Candidate = Tuple[str, int, int, str]  # text, start, end, label


@dataclass
class ClassifierSettings:
    """What a saved classifier needs to rebuild its inputs and its model.

    ``labels`` maps a label code to the display name written in the input (a code
    missing from it is written as is). ``base`` is the :class:`ModelSpec` of the base
    model for mode ``lora`` (the adapter is useless without it).
    """

    kind: str = "llm"
    mode: str = "full"
    pooling: str = "marker"
    max_length: int = 256
    separator: str = "\n"
    labels: Dict[str, str] = field(default_factory=dict)
    base: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {KINDS}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: use one of {MODES}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: use one of {POOLINGS}")
        if self.kind == "llm" and self.pooling == "cls":
            raise ValueError("pooling='cls' reads position 0, which a causal LM computes before it sees "
                             "anything: use 'marker' or 'last'.")
        if self.mode == "lora" and self.base is None:
            raise ValueError("mode='lora' needs the base model spec (settings.base)")
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length} is too short")


def add_markers(tokenizer: Any) -> Tuple[int, int]:
    """Add the marker tokens as special tokens (no-op when present); their ids."""
    tokenizer.add_tokens(list(MARKERS), special_tokens=True)
    open_id, close_id = tokenizer.convert_tokens_to_ids(list(MARKERS))
    return open_id, close_id


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SpanClassifier(nn.Module):
    """A backbone (causal LM, peft model or encoder), marker embeddings and a 2-way head.

    ``lm``/``adapter`` are set when the backbone is a shared :class:`LoadedLM`: every
    forward pass runs with that adapter active, so a generator on the same base is not
    affected.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: ClassifierSettings,
        lm: Optional[LoadedLM] = None,
        adapter: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.tokenizer = tokenizer
        self.model = model
        self.lm = lm
        self.adapter = adapter
        self.open_id, self.close_id = add_markers(tokenizer)
        embeddings = model.get_input_embeddings()
        self.base_vocab = embeddings.weight.shape[0]
        # ids from the first marker on have their rows here, also when the base table is
        # padded beyond the tokenizer (Qwen2.5: 152064 rows, 151665 tokens), whose spare
        # rows are untrained and, under LoRA, frozen
        self.extra_start = min(self.open_id, self.close_id)
        n_extra = len(tokenizer) - self.extra_start
        # new rows ~ the distribution of the existing ones (a strided sample of at most
        # ~8k rows: a 7B table copied to float32 would cost gigabytes)
        table = embeddings.weight.detach()
        sample = table[:: max(1, table.shape[0] // 8192)].float().cpu()
        mean, std = sample.mean(0), sample.std(0)
        self.extra_embeddings = nn.Parameter(mean + torch.randn(n_extra, table.shape[1]) * std)
        self.hidden_size = table.shape[1]
        self.head = nn.Linear(self.hidden_size, 2)
        device = embeddings.weight.device
        self.extra_embeddings.data = self.extra_embeddings.data.to(device)
        self.head.to(device)
        if settings.kind == "encoder":
            self._prefix = [tokenizer.cls_token_id]
            self._suffix = [tokenizer.sep_token_id]
        else:
            self._prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            self._suffix = []

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @contextmanager
    def _active(self) -> Iterator[Any]:
        with (self.lm.use(self.adapter) if self.lm is not None else nullcontext(self.model)) as model:
            yield model

    # -- inputs ------------------------------------------------------------------------------
    def _ids(self, text: str) -> List[int]:
        # input text: special-token strings in it (chat controls, the markers) stay text
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    def encode(self, text: str, start: int, end: int, label: str) -> Tuple[List[int], int]:
        """Token ids of one candidate and the position the head reads.

        When the input is longer than ``max_length``, context is cut from the far ends of
        the sentence, as evenly as possible around the candidate.
        """
        prefix = self._prefix + self._ids(self.settings.labels.get(label, label) + self.settings.separator)
        left, mention, right = self._ids(text[:start]), self._ids(text[start:end]), self._ids(text[end:])
        budget = self.settings.max_length - len(prefix) - len(self._suffix) - 2
        mention = mention[: max(budget, 1)]
        budget = max(0, budget - len(mention))
        keep_left = min(len(left), max(budget // 2, budget - len(right)))
        keep_right = min(len(right), budget - keep_left)
        left = left[len(left) - keep_left :]
        right = right[:keep_right]
        ids = prefix + left + [self.open_id] + mention + [self.close_id] + right + self._suffix
        if self.settings.pooling == "cls":
            position = 0
        elif self.settings.pooling == "marker":
            position = len(prefix) + len(left) + 1 + len(mention)
        else:
            position = len(ids) - 1
        return ids, position

    def collate(self, encoded: Sequence[Tuple[List[int], int]]) -> Dict[str, torch.Tensor]:
        """Right-padded batch; the pad id never matters (the attention mask hides it)."""
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, _) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        positions = torch.tensor([p for _, p in encoded], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "positions": positions}

    # -- model -------------------------------------------------------------------------------
    def _embed(self, model: Any, input_ids: torch.Tensor) -> torch.Tensor:
        table = model.get_input_embeddings()
        is_extra = input_ids >= self.extra_start
        base = table(torch.where(is_extra, torch.zeros_like(input_ids), input_ids))
        extra = self.extra_embeddings[(input_ids - self.extra_start).clamp(min=0)].to(base.dtype)
        return torch.where(is_extra.unsqueeze(-1), extra, base)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, 2)``; class 1 means the candidate is right."""
        device = self.device
        input_ids, attention_mask, positions = input_ids.to(device), attention_mask.to(device), positions.to(device)
        with self._active() as model:
            base = unwrap_peft(model)
            backbone = base.get_decoder() if self.settings.kind == "llm" else base
            hidden = backbone(
                inputs_embeds=self._embed(model, input_ids), attention_mask=attention_mask
            ).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=device), positions]
        return self.head(pooled.float())

    @torch.no_grad()
    def predict_proba(self, candidates: Sequence[Candidate], batch_size: int = 32) -> List[float]:
        """P(correct) for each candidate, in order (batched by length to save padding)."""
        encoded = [self.encode(*c) for c in candidates]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        probs = [0.0] * len(encoded)
        was_training = self.training
        self.eval()
        try:
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                logits = self(**self.collate([encoded[i] for i in idx]))
                for i, p in zip(idx, torch.softmax(logits, -1)[:, 1].tolist()):
                    probs[i] = p
        finally:
            self.train(was_training)
        return probs

    def trainable_parameters(self) -> List[nn.Parameter]:
        params = [p for p in self.head.parameters()] + [self.extra_embeddings]
        seen = {id(p) for p in params}
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in seen:
                params.append(p)
                seen.add(id(p))
        return params

    # -- disk --------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the classifier directory (see the module docstring)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for sub in ("tokenizer", "adapter", "model"):
            if (path / sub).exists():
                shutil.rmtree(path / sub)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self.settings), ensure_ascii=False, indent=2), encoding="utf8")
        tensors = {
            "head.weight": self.head.weight.detach().cpu().contiguous(),
            "head.bias": self.head.bias.detach().cpu().contiguous(),
            "extra_embeddings": self.extra_embeddings.detach().float().cpu().contiguous(),
        }
        save_file(tensors, str(path / HEAD_FILE))
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        if self.settings.mode == "full":
            self.model.save_pretrained(str(path / "model"), safe_serialization=True)
        else:
            # peft puts a non-default adapter in a sub-folder named after it
            adapter = self.adapter or self.model.active_adapter
            with tempfile.TemporaryDirectory(dir=path) as tmp:
                self.model.save_pretrained(tmp, selected_adapters=[adapter])
                saved = Path(tmp) / adapter
                shutil.copytree(saved if saved.exists() else Path(tmp), path / "adapter")
        return path

    def load_head(self, path: Union[str, Path]) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(path) / HEAD_FILE))
        if tensors["extra_embeddings"].shape != self.extra_embeddings.shape:
            raise MedLLMLoadError(
                f"{path}: the saved marker embeddings have shape {tuple(tensors['extra_embeddings'].shape)}, "
                f"the model expects {tuple(self.extra_embeddings.shape)}: the base model is not the one "
                "the classifier was trained on."
            )
        device = self.device
        self.head.weight.data = tensors["head.weight"].to(device)
        self.head.bias.data = tensors["head.bias"].to(device)
        self.extra_embeddings.data = tensors["extra_embeddings"].to(device)


def read_settings(path: Union[str, Path]) -> ClassifierSettings:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise MedLLMLoadError(
            f"{path} is not a saved classifier (no {CONFIG_FILE}). Point the filter's `model` at a "
            "directory written by `python -m spacy medllm train-cls`."
        )
    return ClassifierSettings(**json.loads(config_file.read_text(encoding="utf8")))


def load_classifier(path: Union[str, Path], base: Optional[ModelSpec] = None) -> SpanClassifier:
    """Load a saved classifier. For mode ``lora`` the base comes from the shared loader
    (``base`` overrides the saved spec, e.g. to share the generator's copy or because the
    base moved; ``"embedded"`` is the shipped tiny model) and the adapter is added to it
    under the loader's :func:`default_adapter_name` of the adapter directory."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_links(path)
    settings = read_settings(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    lm, adapter = None, None
    if settings.mode == "lora":
        spec = base if base is not None else ModelSpec(**settings.base)
        lm = load_lm(spec)
        adapter = default_adapter_name(path / "adapter")
        lm.add_adapter(adapter, str(path / "adapter"))
        model = lm.model
    else:
        kwargs = {"local_files_only": True, "use_safetensors": True}
        if settings.kind == "llm":
            model = AutoModelForCausalLM.from_pretrained(str(path / "model"), **kwargs)
        else:  # the encoder is trained without BERT's pooler ([CLS] goes to the head directly)
            model = AutoModel.from_pretrained(str(path / "model"), add_pooling_layer=False, **kwargs)
        model.to(_device())
    model.eval()
    classifier = SpanClassifier(model, tokenizer, settings, lm=lm, adapter=adapter)
    classifier.load_head(path)
    classifier.eval()
    return classifier
