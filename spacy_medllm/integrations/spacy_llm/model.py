"""The runtime as a spacy-llm model: ``@llm_models = "spacy_medllm.HFCausalLM.v1"``.

spacy-llm's built-in Hugging Face models download named hub models and generate one prompt
at a time. This one serves spacy-llm's own ``llm`` component from a local directory (the
tiny model or a user's 7B checkpoint), with an optional LoRA adapter, quantization and
batched generation across all prompts of a ``nlp.pipe`` batch.
"""
from typing import Any, Iterable, Optional

from spacy_llm.registry import registry

from ...llm.backends import AnyModel, open_generator
from ...llm.generation import GenerationRequest
from ...llm.server import ServerGenerator


class HFCausalLM:
    """A spacy-llm model: an iterable of prompts per doc in, an iterable of responses per doc out.

    A prompt is a string (formatted as one user message with the chat template when ``chat``
    is on, sent verbatim otherwise) or a list of chat messages.
    """

    def __init__(
        self,
        spec: AnyModel,
        adapter: Optional[str] = None,
        adapter_name: Optional[str] = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        chat: bool = True,
        context_length: Optional[int] = None,
    ) -> None:
        self.generator = open_generator(spec, adapter, adapter_name)
        self.prompt_template = self.generator.prompt_template()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        self._context_length = context_length

    @property
    def context_length(self) -> Optional[int]:
        """Prompt budget for spacy-llm's sharding: the configured value, else the model's."""
        if self._context_length is not None:
            return self._context_length
        if isinstance(self.generator, ServerGenerator):
            return None  # the server truncates nothing silently: it rejects a prompt too long
        return getattr(self.generator.lm.model.config, "max_position_embeddings", None)

    def __call__(self, prompts: Iterable[Iterable[Any]]) -> Iterable[Iterable[Any]]:
        """Prompts that are already :class:`GenerationRequest`s (our NER task's, which may
        carry a copy constraint) are answered with full :class:`GenerationResult`s, so the
        task sees token scores; any other prompt is answered with its text."""
        per_doc = [[self._templated(p) for p in doc_prompts] for doc_prompts in prompts]
        requests = [
            p if isinstance(p, GenerationRequest) else GenerationRequest(prompt=p, max_new_tokens=self.max_new_tokens, chat=self.chat)
            for doc_prompts in per_doc
            for p in doc_prompts
        ]
        results = iter(self.generator.generate(requests, self.batch_size))
        return [
            [r if isinstance(p, GenerationRequest) else r.text for p, r in zip(doc_prompts, results)]
            for doc_prompts in per_doc
        ]

    def _templated(self, prompt: Any) -> Any:
        """A request of a strategy without a template of its own, rebuilt with the template
        the model was fine-tuned with (as ``medllm_ner`` prompts it)."""
        if isinstance(prompt, GenerationRequest) and prompt.with_template and self.prompt_template:
            return prompt.with_template(self.prompt_template)
        return prompt


@registry.llm_models("spacy_medllm.HFCausalLM.v1")
def make_hf_causal_lm(
    spec: AnyModel,
    adapter: Optional[str] = None,
    adapter_name: Optional[str] = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    chat: bool = True,
    context_length: Optional[int] = None,
) -> HFCausalLM:
    """A local Hugging Face causal LM (``spec``: ``@misc = "spacy_medllm.ModelSpec.v1"``) with an
    optional peft adapter directory, or a served model (``@misc = "spacy_medllm.OpenAIServer.v1"``),
    for spacy-llm's ``llm`` component."""
    return HFCausalLM(
        spec,
        adapter=adapter,
        adapter_name=adapter_name,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        chat=chat,
        context_length=context_length,
    )
