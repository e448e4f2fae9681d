"""What a model setting means for generation: a local checkpoint (:class:`~.loader.ModelSpec`,
loaded in-process through the shared loader) or a served model (:class:`~.server.ServerSpec`)."""
from pathlib import Path
from typing import Optional, Union

from .generation import HFGenerator
from .loader import ModelSpec, default_adapter_name, load_lm
from .server import ServerGenerator, ServerSpec

AnyModel = Union[ModelSpec, ServerSpec]


def open_generator(
    model: AnyModel, adapter: Optional[str] = None, adapter_name: Optional[str] = None
) -> Union[HFGenerator, ServerGenerator]:
    """The generator of ``model``, with the peft ``adapter`` directory on it (in-process
    only: a server serves its adapters under names, which the server block selects)."""
    if isinstance(model, ServerSpec):
        if adapter is not None:
            raise ValueError(
                f"adapter={adapter!r} is for models loaded in-process; serve it with the model "
                "(vLLM: --lora-modules NAME=PATH) and set model = NAME in the OpenAIServer block."
            )
        return ServerGenerator(model)
    lm = load_lm(model)
    name = None
    if adapter is not None:
        name = adapter_name or default_adapter_name(Path(adapter))
        lm.add_adapter(name, adapter)
    return HFGenerator(lm, name)
