"""What a decoding call returns: an answer per prompt and the call's counters.

Its own module so that every stage of the decoder (the shared prefix, the stream) can
count into :class:`DecodeStats` without importing the others.
"""
from dataclasses import dataclass
from typing import List


@dataclass
class DecodeStats:
    """Counters of one decoding call. ``forward_passes`` counts model calls (a batched
    call is one); ``draft_tokens``/``accepted_tokens`` measure the speculation;
    ``prompt_tokens`` is the prompts' total length, ``prefill_tokens`` the prompt tokens
    the model computed (a shared prefix once for all rows that share it); ``positions``
    the token positions the model computed (rejected draft tokens are the waste among
    them); ``key_columns``/``hole_columns`` the cache columns attended to by the rows of
    each pass and the masked ones among them."""

    forward_passes: int = 0
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    positions: int = 0
    key_columns: int = 0
    hole_columns: int = 0
    seconds: float = 0.0


@dataclass
class DecodedRow:
    """One answer. ``text``: the answer (forced prefix included, EOS excluded);
    ``token_ids``: generated ids (EOS included when reached); ``logprobs``: the raw
    log-softmax of each chosen token over the whole vocabulary (as for unconstrained
    generation; a forced token keeps the probability the model gave it);
    ``forward_passes``: model calls this row took part in; ``finished``: EOS reached
    (False when ``max_new_tokens`` cut the answer); ``seconds``: its batch's wall time
    divided by the rows of the batch."""

    text: str
    token_ids: List[int]
    logprobs: List[float]
    forward_passes: int
    finished: bool
    seconds: float = 0.0
