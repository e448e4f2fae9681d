"""The generation interface: prompts (and optional constraints) in; texts, token scores and
counters out.

Components only talk to a :class:`Generator`. The interface is kept this narrow on purpose
so that a server backend (an OpenAI-compatible endpoint such as vLLM, for users who outgrow
one GPU) can implement the same ``generate`` later: it needs nothing but prompt strings, a
token budget and, for scores, the per-token log-probabilities such servers return.
:class:`HFGenerator` is the in-process implementation on a :class:`~.loader.LoadedLM`.
"""
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

from ..types import CopyConstraint
from .copy import generate_constrained
from .loader import LoadedLM

Messages = Sequence[Mapping[str, str]]
# Special tokens that end an assistant turn in common chat templates (Qwen/ChatML, Llama 3,
# Gemma, Phi-3, GLM-4), for tokenizers whose end of turn cannot be read off the template.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|user|>", "<|observation|>")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete.

    prompt: the text exactly as the model sees it (already chat-formatted, e.g. with
        :func:`format_prompt`), or a list of chat messages (``{"role", "content"}``), which
        the generator formats with the tokenizer's chat template.
    chat: format a string prompt as one user message with the chat template.
    max_new_tokens: generation stops after this many tokens if no end token came.
    constraint: the copy rule the answer must keep to; requests carrying one are decoded by
        :func:`spacy_medllm.llm.copy.generate_constrained`.
    literals: parts of a string prompt that are input text (the document), in which
        special-token strings such as ``<|im_end|>`` must stay text instead of becoming
        control tokens; the contents of a message-list prompt always are.
    with_template: rebuilds this request from a prompt template file, for a model that
        carries the template it was fine-tuned with (set when the prompt came from a
        strategy that was given no template of its own).
    """

    prompt: Union[str, Messages]
    max_new_tokens: int = 256
    chat: bool = False
    constraint: Optional[CopyConstraint] = field(default=None, compare=False)
    literals: Tuple[str, ...] = ()
    with_template: Optional[Callable[[str], "GenerationRequest"]] = field(default=None, compare=False, repr=False)


@dataclass
class GenerationResult:
    """A completion and what it cost.

    text: the decoded completion, end token excluded.
    token_ids / logprobs: every generated token (the end token included when one came) and
        the log-softmax probability the model gave it.
    finish_reason: "stop" (an end token) or "length" (max_new_tokens reached).
    forward_passes: model calls this request took part in (a batched call counts once for
        each request in it); generated_tokens: len(token_ids); prompt_tokens: prompt length.
    seconds: wall time of the request's batch divided evenly among its requests, so the
        sum over results is the total time.
    """

    text: str
    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str
    forward_passes: int
    generated_tokens: int
    prompt_tokens: int
    seconds: float

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))


class Generator(Protocol):
    """Anything that completes a batch of requests, results in request order."""

    def generate(
        self, requests: Sequence[GenerationRequest], batch_size: int = 8
    ) -> List[GenerationResult]:
        ...


def format_prompt(tokenizer: Any, messages: Messages) -> str:
    """The prompt text for ``messages``, ending where the assistant's answer begins.

    Uses the tokenizer's chat template; a tokenizer without one (a base model) gets a plain
    "Role: content" layout.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return turns + "Assistant:"


def encode_with_literals(tokenizer: Any, text: str, literals: Sequence[str] = ()) -> List[int]:
    """Token ids of ``text`` (no special tokens added) in which every occurrence of a
    ``literals`` string is tokenized as plain text, so a document containing
    ``<|im_end|><|im_start|>assistant`` cannot open a turn of its own; the rest (the chat
    template's own control tokens) is tokenized as usual.

    Why not always: the pieces are tokenized separately, which for a BPE tokenizer may
    split differently at their borders than the whole text would, so this applies only
    when a literal holds a special-token string.
    """
    specials = [s for s in _special_tokens(tokenizer) if s]
    risky = [lit for lit in literals if lit and any(s in lit for s in specials)]
    if not risky:
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    regions = []
    for lit in risky:
        at = text.find(lit)
        if at < 0:
            raise ValueError(
                "The prompt does not contain the input text verbatim (the chat template changed it), "
                "so special-token strings in the text cannot be kept as text; use a template that "
                "inserts message contents unchanged."
            )
        while at >= 0:
            regions.append((at, at + len(lit)))
            at = text.find(lit, at + len(lit))
    ids: List[int] = []
    pos = 0
    for start, end in sorted(regions):
        start = max(start, pos)
        if end <= start:
            continue
        if start > pos:
            ids += tokenizer(text[pos:start], add_special_tokens=False).input_ids
        ids += tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True).input_ids
        pos = end
    if pos < len(text):
        ids += tokenizer(text[pos:], add_special_tokens=False).input_ids
    return ids


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> List[int]:
    """Ids that end a completion: the tokenizer's EOS, the generation config's EOS ids (a
    model's ``generation_config``) and the chat template's end-of-turn token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    end_of_turn = _template_end_of_turn(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab and tok in _special_tokens(tokenizer))
    return sorted(ids)


def _special_tokens(tokenizer: Any) -> set:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {tok.content for tok in added.values() if tok.special} | set(tokenizer.all_special_tokens)


def _template_end_of_turn(tokenizer: Any) -> Optional[int]:
    """The special token the chat template writes right after an assistant message."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\u2063MEDLLM\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # templates may reject unusual conversations; fall back to the list
        return None
    if marker not in text:
        return None
    after = text.split(marker, 1)[1]
    special = _special_tokens(tokenizer)
    for token_id in tokenizer(after, add_special_tokens=False).input_ids:
        if tokenizer.convert_ids_to_tokens(token_id) in special:
            return token_id
        if tokenizer.decode([token_id]).strip():
            return None
    return None


class PromptEncoder:
    """A request's prompt as the model sees it, in text and token ids, and the ids that end
    an answer: one tokenizer's rules, shared by the in-process generator and a server
    client that sends token ids (so both feed the model the same tokens)."""

    def __init__(self, tokenizer: Any, generation_config: Any = None) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, generation_config)
        self._bos = self._default_bos()

    def prompt_text(self, request: GenerationRequest) -> str:
        """The text the model sees for ``request``."""
        if isinstance(request.prompt, str):
            if request.chat:
                return format_prompt(self.tokenizer, [{"role": "user", "content": request.prompt}])
            return request.prompt
        return format_prompt(self.tokenizer, request.prompt)

    def encode(self, request: GenerationRequest) -> List[int]:
        """Prompt token ids; BOS is added when the tokenizer would add it and the text lacks it.
        Special-token strings inside the input text stay text (see :func:`encode_with_literals`)."""
        literals = tuple(request.literals)
        if not isinstance(request.prompt, str):
            literals += tuple(m["content"] for m in request.prompt)
        elif request.chat:
            literals += (request.prompt,)
        ids = encode_with_literals(self.tokenizer, self.prompt_text(request), literals)
        if self._bos is not None and (not ids or ids[0] != self._bos):
            ids = [self._bos] + ids
        if not ids:
            raise ValueError("Empty prompt: the model needs at least one prompt token.")
        return ids

    def answer_text(self, token_ids: Sequence[int]) -> str:
        """The text of an answer's tokens, its final end token (when it has one) excluded."""
        text_ids = token_ids[:-1] if token_ids and token_ids[-1] in self.stop_ids else token_ids
        return self.tokenizer.decode(list(text_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _default_bos(self) -> Optional[int]:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return None
        return bos if bos in self.tokenizer("a").input_ids else None


class HFGenerator(PromptEncoder):
    """Batched greedy decoding with a Hugging Face model, optionally through one adapter.

    Requests are sorted by prompt length and batched, padded on the left with explicit
    position ids, so a batched completion equals the unbatched one. Decoding is plain
    greedy (argmax); sampling settings in the model's generation config are ignored.
    """

    def __init__(self, lm: LoadedLM, adapter: Optional[str] = None) -> None:
        super().__init__(lm.tokenizer_for(adapter), getattr(lm.model, "generation_config", None))
        self.lm = lm
        self.adapter = adapter

    def prompt_template(self) -> Optional[str]:
        """The prompt template the model (or its adapter) was fine-tuned with, if it carries one."""
        return self.lm.prompt_template(self.adapter)

    def generate(
        self, requests: Sequence[GenerationRequest], batch_size: int = 8
    ) -> List[GenerationResult]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        results: List[Optional[GenerationResult]] = [None] * len(requests)
        constrained = [i for i, r in enumerate(requests) if r.constraint is not None]
        plain = [i for i, r in enumerate(requests) if r.constraint is None]
        if constrained:
            for i, result in zip(
                constrained, self._generate_constrained([requests[i] for i in constrained], batch_size)
            ):
                results[i] = result
        encoded = {i: self.encode(requests[i]) for i in plain}
        order = sorted(plain, key=lambda i: len(encoded[i]))
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            batch = self._greedy([encoded[i] for i in chunk], [requests[i].max_new_tokens for i in chunk])
            for i, result in zip(chunk, batch):
                results[i] = result
        return results  # type: ignore[return-value]

    def _generate_constrained(
        self, requests: Sequence[GenerationRequest], batch_size: int
    ) -> List[GenerationResult]:
        """Requests that carry a copy constraint, through :func:`~.copy.generate_constrained`
        (keep the requests of one text adjacent: their shared prompt prefix is computed
        once). ``max_new_tokens`` only cuts an answer (finish reason "length"): the
        constraint bounds its length."""
        prompts = [self.encode(req) for req in requests]
        with self.lm.use(self.adapter) as model:
            rows = generate_constrained(
                model,
                self.tokenizer,
                prompts,
                [req.constraint for req in requests],
                stop_ids=self.stop_ids,
                max_new_tokens=[req.max_new_tokens for req in requests],
                batch_size=batch_size,
            )
        return [
            GenerationResult(
                text=row.text,
                token_ids=row.token_ids,
                logprobs=row.logprobs,
                finish_reason="stop" if row.finished else "length",
                forward_passes=row.forward_passes,
                generated_tokens=len(row.token_ids),
                prompt_tokens=len(prompt),
                seconds=row.seconds,
            )
            for row, prompt in zip(rows, prompts)
        ]

    def _greedy(self, prompts: List[List[int]], max_new: List[int]) -> List[GenerationResult]:
        import torch

        start = time.perf_counter()
        n = len(prompts)
        width = max(len(p) for p in prompts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[r, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(self.stop_ids, dtype=torch.long)
        out_ids: List[List[int]] = [[] for _ in range(n)]
        out_logprobs: List[List[float]] = [[] for _ in range(n)]
        passes = [0] * n
        finish = ["length"] * n
        alive = torch.ones(n, dtype=torch.bool)
        cache = None
        with self.lm.use(self.adapter) as model, torch.inference_mode():
            device = model.device
            step_input = ids
            for step in range(max(max_new)):
                alive &= torch.tensor([step < m for m in max_new])
                if not alive.any():
                    break
                output = model(
                    input_ids=step_input.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = output.cache
                logprobs = torch.log_softmax(output.logits[:, -1, :].float().cpu(), dim=-1)
                chosen = logprobs.argmax(dim=-1)
                for r in torch.nonzero(alive).flatten().tolist():
                    token = int(chosen[r])
                    out_ids[r].append(token)
                    out_logprobs[r].append(float(logprobs[r, token]))
                    passes[r] += 1
                ended = alive & torch.isin(chosen, stop)
                for r in torch.nonzero(ended).flatten().tolist():
                    finish[r] = "stop"
                alive &= ~ended
                step_input = torch.where(alive, chosen, torch.tensor(pad_id))[:, None]
                mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
        seconds = (time.perf_counter() - start) / n
        results = []
        for r in range(n):
            results.append(
                GenerationResult(
                    text=self.answer_text(out_ids[r]),
                    token_ids=out_ids[r],
                    logprobs=out_logprobs[r],
                    finish_reason=finish[r],
                    forward_passes=passes[r],
                    generated_tokens=len(out_ids[r]),
                    prompt_tokens=len(prompts[r]),
                    seconds=seconds,
                )
            )
        return results
