"""The legal tokens of a configuration and the choice among them.

:func:`_options` lists (once per configuration set) the tokens the constraint allows and
where each leads; :class:`_OptionTable` keeps those lists as tensor rows on the model's
device; :meth:`_Staged.choose` makes the constrained choice for many positions at once. The in-process decoder and a
model server's :class:`~.rule.CopyRule` both choose here, which is why they agree token
for token.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .automaton import DONE, Configs, CopyAutomaton
from .transfer import Payload, to_host
from .vocab import VocabIndex


@dataclass(frozen=True, eq=False)
class _Options:
    """The legal tokens of one configuration set: ``after`` maps each to the configuration
    set it leads to; ``ids`` are all of them ascending (ties of the argmax go to the lowest
    id) and ``is_bracket`` says which start with a bracket (the others are text or EOS).
    ``weigh``: the choice is the constraint's ``text_mass`` decision (brackets and text both
    legal); ``brackets``/``open_bias``: the constraint's. One object per configuration set
    (cached), hashed by identity."""

    after: Dict[int, Configs]
    ids: List[int]
    is_bracket: List[bool]
    weigh: bool = False
    brackets: Tuple[str, str] = ("[", "]")
    open_bias: float = 0.0


def _options(index: VocabIndex, automaton: CopyAutomaton, configs: Configs, eos_ids: Sequence[int]) -> _Options:
    """The legal tokens in ``configs`` (EOS once the answer is complete), cached."""
    options = automaton.options_cache.get(configs)
    if options is None:
        after = index.allowed(automaton, configs)
        if automaton.can_end(configs):
            after.update(dict.fromkeys(eos_ids, DONE))
        if not after:
            raise RuntimeError(
                "No token of the vocabulary continues the constrained answer for "
                f"{automaton.constraint.source!r}: the tokenizer cannot spell it."
            )
        c = automaton.constraint
        brackets = index.bracket_ids(c.open, c.close)
        ids = sorted(after)
        is_bracket = [i in brackets for i in ids]
        weigh = c.text_mass and any(is_bracket) and not all(is_bracket)
        options = _Options(after, ids, is_bracket, weigh, (c.open, c.close), c.open_bias)
        automaton.options_cache[configs] = options
    return options


class _OptionTable:
    """The options a decoding call has met, as rows of padded tensors on the model's device
    (ids, their number, bracket flags, text_mass flag, bracket pair, open bias), so that a
    pass gathers its positions' legal tokens with one index. New rows travel to the device
    in the pass's :class:`~.transfer.Payload`, so the table costs no transfer of its own."""

    def __init__(self) -> None:
        self.row_of: Dict[_Options, int] = {}
        self.pairs: List[Tuple[str, str]] = []
        self.width = 1
        self.device_rows: Dict[str, Any] = {}  # column name -> [rows, ...] tensor on the device

    def stage(self, options: Sequence[_Options], payload: Payload) -> "_Staged":
        """Queue in ``payload`` the table rows of ``options`` and any rows new to the table;
        :meth:`_Staged.choose` uses them once the payload is on the device."""
        import torch

        new = list(dict.fromkeys(o for o in options if o not in self.row_of))
        for pair in dict.fromkeys(o.brackets for o in new):
            if pair not in self.pairs:
                self.pairs.append(pair)
        width = max([self.width] + [len(o.ids) for o in new])
        for o in new:
            self.row_of[o] = len(self.row_of)
        added = None
        if new:  # ids (padded with the first id), flags, then lengths, weigh, pair and bias bits
            ids = [o.ids + o.ids[:1] * (width - len(o.ids)) for o in new]
            flags = [[int(b) for b in o.is_bracket] + [0] * (width - len(o.ids)) for o in new]
            bias = torch.tensor([o.open_bias for o in new], dtype=torch.float64).view(torch.long)
            added = (
                payload.add(ids),
                payload.add(flags),
                payload.add([len(o.ids) for o in new]),
                payload.add([int(o.weigh) for o in new]),
                payload.add([self.pairs.index(o.brackets) for o in new]),
                payload.add(bias),
            )
        rows = payload.add([self.row_of[o] for o in options])
        return _Staged(self, options, rows, added, width)

    def _grow(self, parts: Sequence[Any], added: Tuple[int, ...], width: int) -> None:
        """Append the staged new rows on the device (widening the old rows' padding)."""
        import torch

        ids, flags, lengths, weigh, pair, bias = (parts[k] for k in added)
        n = len(lengths)
        new = {
            "ids": ids.view(n, width),
            "is_bracket": flags.view(n, width).bool(),
            "lengths": lengths,
            "weigh": weigh.bool(),
            "pair": pair,
            "bias": bias.view(torch.float64),
        }
        old = self.device_rows
        if old and width > self.width:  # pad the rows so far: repeat their first id, not a bracket
            grow = width - self.width
            old["ids"] = torch.cat([old["ids"], old["ids"][:, :1].expand(-1, grow)], dim=1)
            old["is_bracket"] = torch.cat([old["is_bracket"], old["is_bracket"].new_zeros((len(old["ids"]), grow))], 1)
        self.device_rows = {k: torch.cat([old[k], v]) if old else v for k, v in new.items()}
        self.width = width


@dataclass
class _Staged:
    """The option rows of one pass's positions, queued in its payload."""

    table: _OptionTable
    options: Sequence[_Options]
    rows: int
    added: Optional[Tuple[int, ...]]
    width: int

    def choose(self, logits: Any, parts: Sequence[Any], index: VocabIndex) -> Any:
        """The constrained choice and its raw log-softmax at every position at once
        (``logits`` [positions, vocab]), as one float64 tensor [2, positions] on the
        device (ids are exact in float64), for one transfer back.

        Plain rule: the argmax over the allowed tokens (ties: lowest id). With
        ``constraint.text_mass`` the allowed tokens that start with a bracket compete with
        the summed probability of every token that does not (the model's "no bracket
        here"); the winning side's best allowed token is taken. A choice depends on its
        position's logits only, so it is the same whether the position was computed alone
        or in a draft. ``open_bias`` is added to the opening-bracket logits first, one
        indexed add per bracket pair, so speculative and plain decoding see the same scores."""
        import torch

        table = self.table
        if self.added is not None:
            table._grow(parts, self.added, self.width)
        flat = logits.float()  # the same tensor when already float32
        cols = table.device_rows
        rows = parts[self.rows]
        pairs = dict.fromkeys(o.brackets for o in self.options)
        if any(o.open_bias for o in self.options):
            bias, pair = cols["bias"][rows], cols["pair"][rows]
            for brackets in pairs:
                opens = index.open_tensor(brackets[0], flat)
                mine = torch.where(pair == table.pairs.index(brackets), bias, torch.zeros_like(bias))
                flat[:, opens] += mine.to(flat.dtype)[:, None]
        k_max = max(len(o.ids) for o in self.options)
        ids, is_bracket = cols["ids"][rows, :k_max], cols["is_bracket"][rows, :k_max]
        valid = torch.arange(k_max, device=flat.device)[None, :] < cols["lengths"][rows][:, None]
        logp = torch.log_softmax(flat, dim=-1)  # one fused pass; the argmax stays on the logits
        values, value_logp = flat.gather(1, ids), logp.gather(1, ids)
        if any(o.weigh for o in self.options):
            # log of the summed probability of all text tokens: log(1 - P(brackets))
            pair = cols["pair"][rows]
            bracket_logp = torch.full_like(logp[:, 0], float("-inf"))
            for brackets in pairs:
                bracket_ids = index.bracket_tensor(*brackets, flat)
                if len(bracket_ids):
                    summed = torch.logsumexp(logp.index_select(1, bracket_ids), -1)
                    bracket_logp = torch.where(pair == table.pairs.index(brackets), summed, bracket_logp)
            text = torch.log(-torch.expm1(bracket_logp.clamp(max=0.0)))
            best_bracket = value_logp.masked_fill(~(valid & is_bracket), float("-inf")).max(dim=-1).values
            side = torch.where((text >= best_bracket)[:, None], ~is_bracket, is_bracket)
            valid = valid & torch.where(cols["weigh"][rows][:, None], side, torch.ones_like(side))
        best = values.masked_fill(~valid, float("-inf")).argmax(dim=-1, keepdim=True)  # first maximum
        return torch.stack([ids.gather(1, best)[:, 0].double(), value_logp.gather(1, best)[:, 0].double()])


def _verify(
    logits: Any, options: Sequence[_Options], index: VocabIndex, table: _OptionTable
) -> Tuple[List[int], List[float]]:
    """The constrained choice and its log-probability at every row of ``logits`` on its
    own (:meth:`_Staged.choose`): one transfer each way. The decoder stages its choices
    in the pass's payload instead."""
    if not len(options):
        return [], []
    payload = Payload()
    staged = table.stage(options, payload)
    chosen, logprobs = to_host(staged.choose(logits, payload.send(logits.device), index))
    return [int(t) for t in chosen], logprobs
