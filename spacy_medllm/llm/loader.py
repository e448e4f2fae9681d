"""Load a Hugging Face causal LM from a local directory, once per process.

Every component that names the same :class:`ModelSpec` gets the same :class:`LoadedLM`, so
a generator, a filter and a resolver built on one 7B base hold one copy of its weights
and switch between their LoRA adapters with :meth:`LoadedLM.use`.
"""
import hashlib
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from spacy.util import registry

from ..errors import MedLLMLoadError, first_line
from ..safety import (
    ALLOW_PICKLE_ENV,
    TRUST_REMOTE_CODE_ENV,
    allowed_by_user,
    check_links,
    require_user_permission,
)
from .adapter_files import adapter_mismatch, check_adapter_dir
from .placement import bnb_config, disable_bnb_cpu_packing, resolve_device, resolve_dtype

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit", "8bit")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A fine-tuned model (or adapter) directory may carry the prompt template it was trained
# with under this name; prompts use it when the strategy names no template of its own.
MODEL_TEMPLATE_FILE = "prompt_template.jinja"


@dataclass(frozen=True)
class ModelSpec:
    """Where a causal LM lives and how to load it.

    path: local directory in the Hugging Face format (config.json, *.safetensors, tokenizer).
    dtype: "auto" keeps the checkpoint's dtype (float16 becomes float32 on the CPU, where
        half-precision kernels are missing), or "float32" / "bfloat16" / "float16".
    device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".
    device_map: passed to ``from_pretrained`` (e.g. "auto" to spread a model over several
        GPUs); set it or ``device``, not both.
    quantization: None, "4bit" or "8bit" (bitsandbytes; 4-bit also runs on the CPU).
    bnb_4bit_quant_type / bnb_4bit_compute_dtype: 4-bit settings ("auto" compute dtype is
        bfloat16 on CUDA, float32 elsewhere).
    trust_remote_code / use_safetensors: off / on by default; turning either the other way
        runs code or unpickles weights from the checkpoint, so a spec that asks for it is
        refused unless the user of the loading process allows it for that path
        (``SPACY_MEDLLM_TRUST_REMOTE_CODE`` / ``SPACY_MEDLLM_ALLOW_PICKLE``, see
        :mod:`spacy_medllm.safety`): a config or a saved pipeline cannot grant it to itself.
    attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None lets transformers pick.
    """

    path: str
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    quantization: Optional[str] = None
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "auto"
    trust_remote_code: bool = False
    use_safetensors: bool = True
    attn_implementation: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        if self.dtype not in DTYPES:
            raise MedLLMLoadError(f"dtype={self.dtype!r} is not supported: use one of {DTYPES}.")
        if self.bnb_4bit_compute_dtype not in DTYPES:
            raise MedLLMLoadError(
                f"bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r} is not supported: use one "
                f"of {DTYPES}."
            )
        if self.quantization not in QUANTIZATIONS:
            raise MedLLMLoadError(
                f"quantization={self.quantization!r} is not supported: use null, \"4bit\" or \"8bit\"."
            )
        device = self.device
        if not (
            device in ("auto", "cpu", "cuda", "mps")
            or (device.startswith("cuda:") and device[5:].isdigit())
        ):
            raise MedLLMLoadError(
                f"device={device!r} is not supported: use \"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"mps\"."
            )
        if self.device_map is not None and device != "auto":
            raise MedLLMLoadError(
                f"Both device={device!r} and device_map={self.device_map!r} are set: set only one "
                "(device_map for a model spread over several devices, device otherwise)."
            )


@registry.misc("spacy_medllm.ModelSpec.v1")
def make_model_spec(
    path: str,
    dtype: str = "auto",
    device: str = "auto",
    device_map: Optional[str] = None,
    quantization: Optional[str] = None,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_compute_dtype: str = "auto",
    trust_remote_code: bool = False,
    use_safetensors: bool = True,
    attn_implementation: Optional[str] = None,
) -> ModelSpec:
    """A :class:`ModelSpec` from a config block (``@misc = "spacy_medllm.ModelSpec.v1"``)."""
    return ModelSpec(
        path=path,
        dtype=dtype,
        device=device,
        device_map=device_map,
        quantization=quantization,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=use_safetensors,
        attn_implementation=attn_implementation,
    )


class LoadedLM:
    """A loaded base model, its tokenizer and the named LoRA adapters on it.

    ``model`` is the transformers model until the first adapter is added, then the
    ``PeftModel`` wrapping it. Adapter switching mutates shared state: run one
    ``with lm.use(...)`` block at a time (spaCy pipelines run components one after another).
    """

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.adapters: Dict[str, Path] = {}
        self._adapter_tokenizers: Dict[str, Any] = {}

    @property
    def device(self):
        return self.model.device

    def tokenizer_for(self, adapter: Optional[str]) -> Any:
        """The tokenizer saved with ``adapter`` if it has one, else the base tokenizer."""
        if adapter is None:
            return self.tokenizer
        self._check_adapter_name(adapter)
        return self._adapter_tokenizers.get(adapter, self.tokenizer)

    def add_adapter(self, name: str, path: str) -> None:
        """Load the peft adapter at ``path`` under ``name`` (again with the same path: no-op)."""
        adapter_dir = Path(path).expanduser().resolve()
        if name in self.adapters:
            if self.adapters[name] == adapter_dir:
                return
            raise MedLLMLoadError(
                f"Adapter name {name!r} is already used for {self.adapters[name]}; give the adapter at "
                f"{adapter_dir} another name."
            )
        adapter_config = check_adapter_dir(adapter_dir, self.spec.use_safetensors)
        base_name = adapter_config.get("base_model_name_or_path")
        tokenizer = None
        if _has_tokenizer(adapter_dir):
            # the base's permission does not extend to a tokenizer shipped in the adapter folder
            trusted = self.spec.trust_remote_code and allowed_by_user(TRUST_REMOTE_CODE_ENV, adapter_dir)
            tokenizer = load_tokenizer(adapter_dir, trusted)
        n_tokens = len(tokenizer) if tokenizer is not None else 0
        mismatch = adapter_mismatch(self._base_model(), adapter_dir, n_tokens)
        if mismatch:
            raise MedLLMLoadError(
                f"The adapter at {adapter_dir} does not fit the base model at {self.spec.path} (the "
                f"adapter was trained on {base_name!r}): {mismatch}. Point `path` at the base model "
                "the adapter was trained on, or train the adapter on this base."
            )
        self._fit_embeddings(n_tokens)
        try:
            from peft import PeftModel

            if self.adapters:
                self.model.load_adapter(str(adapter_dir), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
        except Exception as err:
            # peft injects layers before it loads weights: drop the half-added adapter, and
            # never hand out this copy again if the bare base was modified.
            if self.adapters and name in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(name)
            elif not self.adapters:
                _CACHE.pop(self.spec, None)
            raise MedLLMLoadError(
                f"Loading the adapter at {adapter_dir} onto {self.spec.path} failed (the adapter was "
                f"trained on {base_name!r}): {first_line(err)}. Check that it is a LoRA adapter "
                "for this base model."
            ) from err
        self.model.eval()
        if base_name and Path(str(base_name)).name != Path(self.spec.path).name:
            warnings.warn(
                f"Adapter {name!r} names {base_name!r} as its base, the base loaded is "
                f"{self.spec.path}; the shapes fit, so make sure it is the same model."
            )
        self.adapters[name] = adapter_dir
        if tokenizer is not None:
            self._adapter_tokenizers[name] = tokenizer

    @contextmanager
    def use(self, name: Optional[str]) -> Iterator[Any]:
        """Run the block with adapter ``name`` active, or with all adapters off for ``None``.

        Yields the model to call.
        """
        if name is None:
            if not self.adapters:
                yield self.model
                return
            with self.model.disable_adapter():
                yield self.model
            return
        self._check_adapter_name(name)
        previous = self.model.active_adapter
        self.model.set_adapter(name)
        try:
            yield self.model
        finally:
            self.model.set_adapter(previous)

    def prompt_template(self, adapter: Optional[str] = None) -> Optional[str]:
        """The prompt template the model was fine-tuned with: the one the adapter's folder
        carries, else the base folder's; None when neither carries one. The one place that
        decides it, for ``medllm_ner`` and the spacy-llm model alike."""
        folders = ([self.adapters[adapter]] if adapter is not None and adapter in self.adapters else []) + [Path(self.spec.path)]
        for folder in folders:
            if (folder / MODEL_TEMPLATE_FILE).is_file():
                return str(folder / MODEL_TEMPLATE_FILE)
        return None

    def _check_adapter_name(self, name: str) -> None:
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise MedLLMLoadError(
                f"No adapter named {name!r} is loaded on {self.spec.path} (loaded: {known}); call "
                "add_adapter(name, path) first."
            )

    def _base_model(self) -> Any:
        return self.model.get_base_model() if self.adapters else self.model

    def _fit_embeddings(self, n_tokens: int) -> None:
        """Grow the embeddings when a fine-tune added tokens (peft then loads their rows)."""
        embeddings = self.model.get_input_embeddings()
        if n_tokens > embeddings.weight.shape[0]:
            self.model.resize_token_embeddings(n_tokens)


def default_adapter_name(path: Union[str, Path]) -> str:
    """A name peft accepts for the adapter at ``path``: the directory name (characters other
    than letters, digits and ``_`` replaced) and a hash of the full path, so that two
    adapters saved as ``.../final`` get different names."""
    resolved = str(Path(path).expanduser().resolve())
    stem = re.sub(r"\W", "_", Path(resolved).name) or "adapter"
    return f"{stem}_{hashlib.sha1(resolved.encode('utf8')).hexdigest()[:8]}"


_CACHE: Dict[ModelSpec, LoadedLM] = {}


def load_lm(spec: ModelSpec) -> LoadedLM:
    """The :class:`LoadedLM` for ``spec``, loaded on first use and shared afterwards; the
    path ``"embedded"`` is the tiny model shipped in the package."""
    from ..embedded import resolve_model_path  # it imports this module

    if _HUB_ID.fullmatch(spec.path) and not Path(spec.path).expanduser().exists():
        raise MedLLMLoadError(
            f"Model path {spec.path} does not exist here and looks like a Hugging Face Hub id, but models "
            "are read from local directories only (nothing is downloaded at run time). Download it first, e.g. "
            f"`huggingface-cli download {spec.path} --local-dir /models/{Path(spec.path).name}`, and point `path` there."
        )
    key = replace(spec, path=str(resolve_model_path(spec.path).expanduser().resolve()))
    if key not in _CACHE:
        _CACHE[key] = _load(key)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded model (their memory is freed once nothing else holds them)."""
    _CACHE.clear()


def _load(spec: ModelSpec) -> LoadedLM:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(spec.path)
    config = _check_model_dir(path, spec)
    device = resolve_device(spec.device)
    kwargs: Dict[str, Any] = {
        "dtype": resolve_dtype(spec.dtype, config, device),
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": spec.use_safetensors,
        "local_files_only": True,
    }
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    if spec.quantization is not None:
        kwargs["quantization_config"] = bnb_config(spec, device)
        if spec.device_map is None:
            kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        if "device_map" not in kwargs:
            model.to(torch.device(device))
        model.eval()
        if spec.quantization is not None:
            if device == "cpu":
                disable_bnb_cpu_packing(model)
            # bitsandbytes kernels fail at the first forward pass, not at loading: find out now.
            with torch.inference_mode():
                model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device))
    except Exception as err:
        if spec.quantization is not None:
            raise MedLLMLoadError(
                f"Loading {path} with {spec.quantization} quantization failed on device {device!r}: "
                f"{first_line(err)}. bitsandbytes may not support this platform or model; set "
                "quantization = null, or install a bitsandbytes build for your hardware."
            ) from err
        raise MedLLMLoadError(f"Loading the model at {path} failed: {first_line(err)}") from err
    return LoadedLM(spec, model, load_tokenizer(path, spec.trust_remote_code))


def _check_model_dir(path: Path, spec: ModelSpec) -> Dict[str, Any]:
    if not path.exists():
        raise MedLLMLoadError(
            f"Model path {path} does not exist. Point `path` at a local directory holding a Hugging "
            "Face model (build the tiny one with `python -m spacy medllm init-tiny DIR --corpus FILE`)."
        )
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.exists():
        raise MedLLMLoadError(
            f"{path} has no config.json, so it is not a Hugging Face model directory. Point `path` at "
            "the directory that holds config.json, the *.safetensors weights and the tokenizer files."
        )
    check_links(path)
    if spec.trust_remote_code:
        require_user_permission(TRUST_REMOTE_CODE_ENV, path, "run the model's own Python code (trust_remote_code)")
    if not spec.use_safetensors:
        require_user_permission(ALLOW_PICKLE_ENV, path, "unpickle weights (use_safetensors = false)")
    try:
        config = json.loads(config_file.read_text(encoding="utf8"))
    except ValueError as err:
        raise MedLLMLoadError(f"{config_file} is not valid JSON ({err}); restore it from the original checkpoint.") from err
    if spec.use_safetensors and not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weight files"]
        raise MedLLMLoadError(
            f"{path} holds no *.safetensors weights ({', '.join(found[:3])}). Convert the checkpoint "
            "to safetensors, or set use_safetensors = false to load pickled .bin weights (only for "
            "checkpoints you trust)."
        )
    if "auto_map" in config and not spec.trust_remote_code:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise MedLLMLoadError(
                f"{path} needs its own Python code (model_type {config.get('model_type')!r} is not "
                "built into transformers). Use a transformers-native version of the checkpoint, or, "
                "if you trust its code, set trust_remote_code = true and allow it for this folder with "
                f"{TRUST_REMOTE_CODE_ENV}={path} in the environment."
            )
    if not _has_tokenizer(path):
        raise MedLLMLoadError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the tokenizer with the "
            "model (tokenizer.save_pretrained(DIR)) or copy its files there."
        )
    return config


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as err:
        raise MedLLMLoadError(
            f"Loading the tokenizer at {path} failed: {first_line(err)}. The directory must hold "
            "the tokenizer files saved with the model (tokenizer.json / tokenizer_config.json)."
        ) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
