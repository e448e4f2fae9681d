"""Generation on an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server).

Users who outgrow one process serve their model with an engine (paged attention, continuous
batching, tensor parallelism, many LoRA adapters on one base) and point clients at it.
:class:`ServerGenerator` is that client behind the same ``generate`` as the in-process
:class:`~.generation.HFGenerator`: requests go out concurrently through the ``openai``
library (bounded in flight; retried with backoff on 429, 5xx and dropped connections by
the library) and come back in request order with per-token log-probabilities.

The copy constraint travels in one of two forms (``copy_rule``):

- ``processor`` (vLLM): the constraint rides in ``vllm_xargs`` and the server's
  :mod:`.vllm_copy` logits processor makes the in-process decoder's choice at every step,
  so the answers are token for token the in-process ones (``text_mass`` included).
- ``grammar``: the constraint as a grammar (:mod:`.copy_grammar`) in the dialect's field,
  without its span limit (:func:`served_constraint`). The server then takes the most
  probable allowed token: the in-process decoder with ``text_mass`` off.

With a local ``tokenizer`` the client formats and tokenizes prompts exactly as in-process
and sends token ids; without one it sends chat messages and the server applies its own
chat template. Every constrained answer is checked against its constraint, so a server
that ignores the grammar or lacks the processor is reported instead of trusted.
"""
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import openai
from spacy.util import registry

from ..errors import MedLLMServerError
from ..types import CopyConstraint
from .copy import COPY_REQUEST_ARG, CopyAutomaton, copy_request_arg
from .copy_grammar import copy_grammar
from .generation import GenerationRequest, GenerationResult, PromptEncoder
from .loader import MODEL_TEMPLATE_FILE, load_tokenizer

DIALECTS = ("vllm", "sglang", "llama.cpp", "plain")
COPY_RULES = ("auto", "processor", "grammar", "none")
# where each dialect takes a grammar (vLLM: xgrammar EBNF; SGLang: EBNF; llama.cpp: GBNF)
GRAMMAR_FIELDS = {"vllm": ("structured_outputs", "grammar"), "sglang": ("ebnf",), "llama.cpp": ("grammar",)}
PROCESSOR = "spacy_medllm.llm.vllm_copy:CopyLogitsProcessor"
# vLLM writes token ids instead of token texts with this extension
TOKEN_ID_PREFIX = "token_id:"

logger = logging.getLogger("spacy_medllm")



@dataclass(frozen=True)
class ServerSpec:
    """An OpenAI-compatible server that generates (``@misc = "spacy_medllm.OpenAIServer.v1"``).

    base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
    model: the served model's name, or a LoRA adapter's name as given to the server
        (vLLM: ``--lora-modules NAME=PATH``).
    api_key_env: the name of the environment variable that holds the API key (never the
        key itself in a config); None for servers without keys.
    dialect: "vllm", "sglang", "llama.cpp" or "plain" (no grammar support: answers are not
        held to the copy constraint).
    copy_rule: "processor" (vLLM with the :mod:`.vllm_copy` processor: in-process answers),
        "grammar", "none", or "auto" (processor on vLLM, grammar on SGLang and llama.cpp,
        none on plain).
    max_concurrency: requests in flight at once; timeout: seconds per request;
        max_retries: retries of a request on 429, 5xx and connection errors, with backoff.
    tokenizer: a local directory with the model's tokenizer (and chat template): prompts
        are then formatted and tokenized here and sent as token ids, exactly as in-process;
        None sends chat messages to the server's chat endpoint.
    """

    base_url: str
    model: str
    api_key_env: Optional[str] = None
    dialect: str = "vllm"
    copy_rule: str = "auto"
    max_concurrency: int = 16
    timeout: float = 300.0
    max_retries: int = 3
    tokenizer: Optional[str] = None

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise MedLLMServerError(f"dialect={self.dialect!r} is not supported: use one of {DIALECTS}.")
        if self.copy_rule not in COPY_RULES:
            raise MedLLMServerError(f"copy_rule={self.copy_rule!r} is not supported: use one of {COPY_RULES}.")
        if self.copy_rule == "processor" and self.dialect != "vllm":
            raise MedLLMServerError(f"copy_rule=\"processor\" needs dialect=\"vllm\" (got {self.dialect!r}).")
        if self.copy_rule == "grammar" and self.dialect == "plain":
            raise MedLLMServerError("The plain dialect has no grammar field: use copy_rule \"none\" or the server's dialect.")
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise MedLLMServerError("max_concurrency must be >= 1, max_retries >= 0 and timeout > 0.")

    @property
    def rule(self) -> str:
        """The copy rule in effect once "auto" is resolved."""
        if self.copy_rule != "auto":
            return self.copy_rule
        return {"vllm": "processor", "plain": "none"}.get(self.dialect, "grammar")


@registry.misc("spacy_medllm.OpenAIServer.v1")
def make_server_spec(
    base_url: str,
    model: str,
    api_key_env: Optional[str] = None,
    dialect: str = "vllm",
    copy_rule: str = "auto",
    max_concurrency: int = 16,
    timeout: float = 300.0,
    max_retries: int = 3,
    tokenizer: Optional[str] = None,
) -> ServerSpec:
    """A :class:`ServerSpec` from a config block; usable wherever a model spec is."""
    return ServerSpec(base_url, model, api_key_env, dialect, copy_rule, max_concurrency, timeout, max_retries, tokenizer)


class ServerGenerator:
    """The :class:`~.generation.Generator` of a :class:`ServerSpec`. ``forward_passes``
    of its results is 0: a server does not say how many model calls it made."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.encoder = _local_encoder(Path(spec.tokenizer)) if spec.tokenizer else None
        self.tokenizer = self.encoder.tokenizer if self.encoder is not None else None
        if spec.rule == "processor" and self.encoder is None:
            raise MedLLMServerError(
                f"copy_rule \"processor\" (the default on vLLM) needs the model's end tokens for {spec.base_url}: "
                "set tokenizer to a local folder with the model's tokenizer files, or copy_rule = \"grammar\"."
            )
        api_key = "none"
        if spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env, "")
            if not api_key:
                raise MedLLMServerError(
                    f"The API key for {spec.base_url} is read from the environment variable "
                    f"{spec.api_key_env}, which is not set."
                )
        self.client = openai.OpenAI(
            base_url=spec.base_url, api_key=api_key, timeout=spec.timeout, max_retries=spec.max_retries
        )
        self._checked = False
        self._warned: set = set()

    def prompt_template(self) -> Optional[str]:
        """The prompt template the local tokenizer folder carries (a fine-tuned model's)."""
        if self.spec.tokenizer and (Path(self.spec.tokenizer) / MODEL_TEMPLATE_FILE).is_file():
            return str(Path(self.spec.tokenizer) / MODEL_TEMPLATE_FILE)
        return None

    def generate(self, requests: Sequence[GenerationRequest], batch_size: int = 8) -> List[GenerationResult]:
        """Results in request order; ``batch_size`` is ignored (the server batches, and
        ``max_concurrency`` bounds what is in flight)."""
        if not requests:
            return []
        self.check()
        with ThreadPoolExecutor(max_workers=self.spec.max_concurrency) as pool:
            return list(pool.map(self._complete, requests))

    def check(self) -> None:
        """Fail early, with what to fix, when the server is unreachable or lacks the model."""
        if self._checked:
            return
        try:
            served = [m.id for m in self.client.models.list()]
        except openai.APIError as err:
            raise self._error(err) from err
        if self.spec.model not in served:
            raise MedLLMServerError(
                f"The server at {self.spec.base_url} serves no model named {self.spec.model!r} (it "
                f"serves {', '.join(served) or 'nothing'}). Set model to one of them; a LoRA adapter "
                "is served under the name given to the server (vLLM: --lora-modules NAME=PATH)."
            )
        self._checked = True

    # -- one request -----------------------------------------------------------------------
    def _complete(self, request: GenerationRequest) -> GenerationResult:
        start = time.perf_counter()
        fields = self._constraint_fields(request)
        try:
            if self.encoder is None and (request.chat or not isinstance(request.prompt, str)):
                result = self._chat(request, fields)
            else:
                result = self._completion(request, fields)
        except openai.APIError as err:
            raise self._error(err, grammar=self.spec.rule == "grammar" and request.constraint is not None) from err
        result.seconds = time.perf_counter() - start
        self._check_answer(request, result)
        return result

    def _constraint_fields(self, request: GenerationRequest) -> Dict[str, Any]:
        constraint, rule = request.constraint, self.spec.rule
        if constraint is None or rule == "none":
            if constraint is not None:
                self._warn_once("none", "%s: copy_rule \"none\": answers are not held to the copy constraint")
            return {}
        if rule == "processor":
            return {"vllm_xargs": {COPY_REQUEST_ARG: copy_request_arg(constraint, self.encoder.stop_ids)}}
        if constraint.text_mass:
            self._warn_once(
                "grammar",
                "%s: with a grammar the server takes the most probable allowed token (text_mass off), "
                "which brackets more than in-process; vLLM with the copy logits processor answers as in-process",
            )
        *path, key = GRAMMAR_FIELDS[self.spec.dialect]
        fields: Dict[str, Any] = {key: copy_grammar(served_constraint(constraint))}
        for outer in reversed(path):
            fields = {outer: fields}
        return fields

    def _completion(self, request: GenerationRequest, fields: Dict[str, Any]) -> GenerationResult:
        extra = dict(fields)
        if self.encoder is not None:
            prompt: Any = self.encoder.encode(request)
            prompt_tokens = len(prompt)
            if self.spec.dialect == "vllm":
                extra.update(stop_token_ids=self.encoder.stop_ids, return_tokens_as_token_ids=True)
        else:
            prompt, prompt_tokens = request.prompt, 0
        response = self.client.completions.create(
            model=self.spec.model, prompt=prompt, max_tokens=request.max_new_tokens, temperature=0.0,
            logprobs=1, extra_body=extra or None,
        )
        choice = response.choices[0]
        tokens = list(choice.logprobs.tokens or []) if choice.logprobs else []
        logprobs = [float(x) for x in (choice.logprobs.token_logprobs or [])] if choice.logprobs else []
        return self._result(choice.text, tokens, logprobs, choice.finish_reason, prompt_tokens)

    def _chat(self, request: GenerationRequest, fields: Dict[str, Any]) -> GenerationResult:
        messages = request.prompt if not isinstance(request.prompt, str) else [{"role": "user", "content": request.prompt}]
        extra = dict(fields)
        if self.spec.dialect == "vllm":
            extra.update(return_tokens_as_token_ids=True)
        response = self.client.chat.completions.create(
            model=self.spec.model, messages=[dict(m) for m in messages], max_tokens=request.max_new_tokens,
            temperature=0.0, logprobs=True, extra_body=extra or None,
        )
        choice = response.choices[0]
        content = (choice.logprobs.content or []) if choice.logprobs else []
        prompt_tokens = response.usage.prompt_tokens if response.usage else 0
        return self._result(
            choice.message.content or "", [c.token for c in content], [float(c.logprob) for c in content],
            choice.finish_reason, prompt_tokens,
        )

    def _result(self, text: str, tokens: List[str], logprobs: List[float], finish: str, prompt_tokens: int) -> GenerationResult:
        token_ids = [int(t[len(TOKEN_ID_PREFIX):]) for t in tokens if t.startswith(TOKEN_ID_PREFIX)]
        if len(token_ids) != len(tokens):
            token_ids = []  # the server wrote token texts, which do not map back to ids reliably
        if self.encoder is not None and token_ids:  # decode as in-process does
            text = self.encoder.answer_text(token_ids)
        return GenerationResult(
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason="length" if finish == "length" else "stop",
            forward_passes=0,
            generated_tokens=len(tokens),
            prompt_tokens=prompt_tokens,
            seconds=0.0,
        )

    def _check_answer(self, request: GenerationRequest, result: GenerationResult) -> None:
        """A constrained answer that is not a legal copy means the server did not apply
        the constraint: say which part is missing instead of passing it on."""
        constraint, rule = request.constraint, self.spec.rule
        if constraint is None or rule == "none" or result.finish_reason != "stop":
            return
        automaton = CopyAutomaton(served_constraint(constraint) if rule == "grammar" else constraint)
        configs = automaton.advance_bytes(automaton.initial, result.text.encode("utf-8"))
        if configs and automaton.can_end(configs):
            return
        if rule == "processor":
            fix = (
                f"it does not run the copy logits processor. Start vLLM with --logits-processors {PROCESSOR} "
                "(spacy-medllm installed in its environment), or set copy_rule = \"grammar\""
            )
        else:
            fix = f"it ignored the copy grammar. Set dialect to the server's kind ({', '.join(DIALECTS[:3])}), or copy_rule = \"none\""
        raise MedLLMServerError(
            f"The server at {self.spec.base_url} answered {result.text[:80]!r}, which is not a copy of "
            f"{constraint.source[:40]!r}: {fix}."
        )

    def _error(self, err: Exception, grammar: bool = False) -> MedLLMServerError:
        url = self.spec.base_url
        if isinstance(err, openai.APIConnectionError):
            return MedLLMServerError(
                f"Cannot reach an OpenAI-compatible server at {url} ({err}) after {self.spec.max_retries} "
                "retries. Start it (README: \"Serving with vLLM\") or correct base_url."
            )
        if isinstance(err, openai.AuthenticationError):
            return MedLLMServerError(
                f"The server at {url} rejected the API key: put a valid one in the environment variable "
                f"named by api_key_env ({self.spec.api_key_env})."
            )
        if isinstance(err, openai.NotFoundError):
            return MedLLMServerError(f"The server at {url} answered 404 ({err}): check base_url (it ends in /v1) and model.")
        if isinstance(err, openai.BadRequestError) and grammar:
            return MedLLMServerError(
                f"The server at {url} rejected the copy grammar ({err}). It needs grammar-constrained decoding "
                "(vLLM: structured outputs; SGLang: a grammar backend; llama.cpp: GBNF): set dialect to "
                "the server's kind, or copy_rule = \"none\"."
            )
        return MedLLMServerError(f"The server at {url} failed: {err}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, self.spec.base_url)


def served_constraint(constraint: CopyConstraint) -> CopyConstraint:
    """The constraint a grammar carries: all of it but ``max_span_chars``. Counting the
    characters of an open span takes a state per (position, span length), about
    ``max_span_chars`` times the rules (3,067 against 312 for a CMeEE sentence of 77
    characters on average), and engines compile a grammar per request in time that grows
    faster than its size (xgrammar: 1.6 s against 0.02 s). So a served model may keep a
    bracket open longer than ``max_span_chars``, where the in-process decoder closes it."""
    return dataclasses.replace(constraint, max_span_chars=max(len(constraint.source), 1))


def _local_encoder(folder: Path) -> PromptEncoder:
    """The prompt rules of the model whose tokenizer (and generation config, for its end
    tokens) lie in ``folder``, as the in-process generator applies them."""
    from transformers import GenerationConfig

    generation_config = None
    if (folder / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return PromptEncoder(load_tokenizer(folder, trust_remote_code=False), generation_config)
