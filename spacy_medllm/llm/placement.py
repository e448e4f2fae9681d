"""Where and how a model's weights live: the device (``auto`` picks CUDA, then MPS, then the
CPU), the dtype, and bitsandbytes 4/8-bit quantization."""
from typing import Any, Dict

from ..errors import MedLLMLoadError, first_line


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MedLLMLoadError(
                f"device={device!r} but CUDA is not available (torch {torch.__version__}). Install a "
                "CUDA build of torch on a machine with a GPU, or set device = \"cpu\" or \"auto\"."
            )
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise MedLLMLoadError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise MedLLMLoadError("device=\"mps\" but MPS is not available: set device = \"cpu\" or \"auto\".")
    return device


def resolve_dtype(dtype: str, config: Dict[str, Any], device: str):
    import torch

    if dtype == "auto":
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        if dtype == "float16" and device == "cpu":
            dtype = "float32"
    return getattr(torch, dtype)


def bnb_config(spec: Any, device: str):
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:
        raise MedLLMLoadError(
            f"quantization={spec.quantization!r} needs bitsandbytes, which cannot be imported "
            f"({first_line(err)}): pip install bitsandbytes, or set quantization = null."
        ) from err
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = spec.bnb_4bit_compute_dtype
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def disable_bnb_cpu_packing(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    The packed format rounds the quantization scales to bfloat16 and is undone only
    approximately whenever ``state_dict()`` is called (peft does so when it loads an
    adapter), so a base model's outputs would change after an adapter is added; it also
    needs layer widths divisible by 64. The unpacked path computes in the configured
    ``bnb_4bit_compute_dtype``.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
