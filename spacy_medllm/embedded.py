"""The embedded default model: a tiny character-level Qwen2 fine-tuned on the shipped CMeEE
sample with the symbol strategy, stored in the package so that ``medllm_ner`` works with no
download. ``path = "embedded"`` in a model spec names it; ``project.yml`` (``train-embedded``)
rebuilds it."""
from pathlib import Path
from typing import Union

from .errors import MedLLMLoadError

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).parent / "embedded_model"


def resolve_model_path(path: Union[str, Path]) -> Path:
    """``path`` as a directory, with ``"embedded"`` meaning the shipped tiny model."""
    if str(path) != EMBEDDED:
        return Path(path)
    if not (EMBEDDED_DIR / "config.json").exists():
        raise MedLLMLoadError(
            f"The embedded default model is missing from {EMBEDDED_DIR}. Reinstall spacy-medllm, "
            "or rebuild it with `spacy project run train-embedded`."
        )
    return EMBEDDED_DIR
