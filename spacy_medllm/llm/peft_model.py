"""The one peft helper the decoders and the loader share; it imports neither spaCy nor peft,
so the copy decoder can run inside a model server's process (see :mod:`.vllm_copy`)."""
from typing import Any


def unwrap_peft(model: Any) -> Any:
    """The transformers model under a peft wrapper (its modules carry the adapters), or
    ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
