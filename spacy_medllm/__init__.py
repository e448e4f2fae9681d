"""spacy-medllm: generative medical NER with fine-tuned LLMs inside spaCy pipelines."""
from .about import __version__

DEFAULT_SPANS_KEY = "sc"

__all__ = ["__version__", "DEFAULT_SPANS_KEY"]
