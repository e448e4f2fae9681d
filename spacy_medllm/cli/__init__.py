"""``python -m spacy medllm …``: the project's commands, added to spaCy's CLI through the
``spacy_cli`` entry point (importing a command module registers its command)."""
from . import (  # noqa: F401
    build_cls_data,
    build_instructions,
    calibrate_cls,
    convert,
    errors,
    exemplars,
    init_tiny,
    predict,
    train_cls,
    train_llm,
    visualize,
)
from .app import medllm_cli

__all__ = ["medllm_cli"]
