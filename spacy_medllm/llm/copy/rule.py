"""The copy rule one position at a time, for a sampler that is not ours (a model
server's), and the form in which a request carries its constraint to that server.

It runs inside a vLLM server process (:mod:`..vllm_copy`) whose environment has torch,
transformers and vLLM only, so this module (and what it imports) needs neither spaCy nor
peft.
"""
import dataclasses
import json
from typing import Any, List, Sequence, Tuple

from ...types import CopyConstraint
from .automaton import DONE, Configs, CopyAutomaton
from .options import _options, _OptionTable, _verify
from .vocab import vocab_index


class CopyCursor:
    """Where one answer decoded outside this module stands in its constraint: the tokens
    taken so far (``taken``) and the configurations they lead to."""

    def __init__(self, automaton: CopyAutomaton) -> None:
        self.automaton = automaton
        self.configs: Configs = automaton.initial
        self.taken = 0


class CopyRule:
    """The in-process decoder's choice, one position at a time, for a sampler that is not
    ours (a model server's): :meth:`choose` returns, for each cursor, the token
    :func:`~.stream.decode_constrained` would take given the logits of its next position (the same
    option sets, ``open_bias`` and ``text_mass`` rule, ties to the lowest id); the caller
    then calls :meth:`take` with the token the sampler emitted."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int]) -> None:
        if not eos_token_ids:
            raise ValueError("Constrained decoding needs at least one end token id.")
        self.index = vocab_index(tokenizer)
        self.eos_ids = sorted(set(eos_token_ids))
        self.table = _OptionTable()

    def start(self, constraint: CopyConstraint) -> CopyCursor:
        return CopyCursor(CopyAutomaton(constraint))

    def choose(self, logits: Any, cursors: Sequence[CopyCursor]) -> List[int]:
        """``logits`` [len(cursors), vocab]: the chosen token per cursor (an end token for
        a finished one). The logits are changed in place by ``open_bias`` only."""
        live = [k for k, c in enumerate(cursors) if c.configs != DONE]
        chosen = [self.eos_ids[0]] * len(cursors)
        if live:
            options = [_options(self.index, cursors[k].automaton, cursors[k].configs, self.eos_ids) for k in live]
            rows = logits if len(live) == len(cursors) else logits[live]
            for k, token in zip(live, _verify(rows, options, self.index, self.table)[0]):
                chosen[k] = token
        return chosen

    def take(self, cursor: CopyCursor, token: int) -> bool:
        """Advance ``cursor`` by ``token``; False (and the cursor unchanged) when the token
        is not a legal continuation (nothing is, after the end)."""
        if cursor.configs == DONE:
            return False
        after = _options(self.index, cursor.automaton, cursor.configs, self.eos_ids).after.get(token)
        if after is None:
            return False
        cursor.configs = after
        cursor.taken += 1
        return True


# the key of a request's constraint among vLLM's per-request arguments (vllm_xargs)
COPY_REQUEST_ARG = "medllm_copy"


def copy_request_arg(constraint: CopyConstraint, eos_token_ids: Sequence[int]) -> str:
    """A constraint and its end tokens as one string, the form a request carries to a
    server-side :class:`CopyRule` (vLLM's ``vllm_xargs``); read back by
    :func:`read_copy_request_arg`."""
    return json.dumps({"constraint": dataclasses.asdict(constraint), "eos": sorted(set(eos_token_ids))}, ensure_ascii=False)


def read_copy_request_arg(arg: str) -> Tuple[CopyConstraint, Tuple[int, ...]]:
    """The constraint and end tokens :func:`copy_request_arg` wrote; ValueError on anything else."""
    try:
        data = json.loads(arg)
        eos = tuple(int(t) for t in data["eos"])
        constraint = CopyConstraint(**data["constraint"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"not a copy constraint written by copy_request_arg: {err}") from err
    if not eos:
        raise ValueError("a copy constraint needs at least one end token id")
    return constraint, eos
