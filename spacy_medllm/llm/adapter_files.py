"""A peft adapter folder checked before peft touches the base model: that it is one, that it
may be loaded (links, pickles) and that its weights fit the base."""
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import MedLLMLoadError
from ..safety import ALLOW_PICKLE_ENV, check_links, require_user_permission

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)"
)


def check_adapter_dir(path: Path, use_safetensors: bool) -> Dict[str, Any]:
    if not path.exists():
        raise MedLLMLoadError(
            f"Adapter path {path} does not exist. Point the adapter at the directory a peft model "
            "was saved to (model.save_pretrained(DIR)), or leave it unset to use the base model."
        )
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise MedLLMLoadError(
            f"{path} has no adapter_config.json, so it is not a peft adapter directory. Save the "
            "adapter with PeftModel.save_pretrained(DIR), or, for a fully merged fine-tune, use the "
            "directory as the model path instead of as an adapter."
        )
    check_links(path)
    if not use_safetensors:
        require_user_permission(ALLOW_PICKLE_ENV, path, "unpickle adapter weights (use_safetensors = false)")
    if use_safetensors and not (path / ADAPTER_WEIGHTS).exists():
        raise MedLLMLoadError(
            f"{path} has no {ADAPTER_WEIGHTS}. Save the adapter with safetensors (the peft default), "
            "or set use_safetensors = false to load pickled adapter weights (only ones you trust)."
        )
    return json.loads(config_file.read_text(encoding="utf8"))


def adapter_mismatch(model: Any, path: Path, n_tokens: int) -> Optional[str]:
    """Why the adapter's weights do not fit ``model`` (None when they fit).

    Checked before peft touches the model, because peft injects the LoRA layers first and
    fails on the weights only afterwards, leaving a modified base behind.
    """
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        return None
    from safetensors import safe_open

    modules = dict(model.named_modules())
    vocab_modules = {
        name
        for name, module in modules.items()
        if module is model.get_input_embeddings() or module is model.get_output_embeddings()
    }
    with safe_open(str(weights), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    for key, shape in sorted(shapes.items()):
        name = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        match = _LORA_KEY.match(name)
        module_name, kind = (match["module"], match["kind"]) if match else (name.rsplit(".", 1)[0], "full")
        module = modules.get(module_name)
        if module is None:
            return f"it has weights for module {module_name!r}, which the base model does not have"
        module = getattr(module, "original_module", module)  # a peft modules_to_save wrapper
        is_linear = hasattr(module, "in_features")
        n_in = module.in_features if is_linear else getattr(module, "num_embeddings", None)
        n_out = module.out_features if is_linear else getattr(module, "embedding_dim", None)
        if n_in is None or n_out is None or len(shape) != 2 or kind == "lora_magnitude_vector":
            continue
        if module_name in vocab_modules and n_tokens:  # grown to the adapter's tokenizer
            n_in, n_out = (n_in, max(n_out, n_tokens)) if is_linear else (max(n_in, n_tokens), n_out)
        expected = {
            "lora_A": (None, n_in),
            "lora_embedding_A": (None, n_in),
            "lora_B": (n_out, None),
            "lora_embedding_B": (n_out, None),
            "full": (n_out, n_in) if is_linear else (n_in, n_out),
        }[kind]
        if any(want is not None and want != got for want, got in zip(expected, shape)):
            want = tuple("r" if w is None else w for w in expected)
            return f"size mismatch for {key}: the adapter has shape {shape}, the base model needs {want}"
    return None
