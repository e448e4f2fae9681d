"""spacy-medllm: generative medical NER with fine-tuned LLMs inside spaCy pipelines."""
import logging

from .about import __version__

DEFAULT_SPANS_KEY = "sc"


class _NoOptionalKernelNotice(logging.Filter):
    """bitsandbytes (imported by transformers even when nothing is quantized) warns on CPUs
    with AVX512-BF16 that an optional downloadable kernel is missing, on every run; it falls
    back to its own kernel, and no model here is fetched from a hub, so the notice only
    misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoOptionalKernelNotice())

__all__ = ["__version__", "DEFAULT_SPANS_KEY"]
