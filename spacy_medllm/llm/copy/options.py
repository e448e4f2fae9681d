"""The legal tokens of a configuration and the choice among them.

:func:`_options` lists (once per configuration set) the tokens the constraint allows and
where each leads; :class:`_OptionTable` keeps those lists as tensor rows; :func:`_verify`
makes the constrained choice for many positions at once. The in-process decoder and a
model server's :class:`~.rule.CopyRule` both choose here, which is why they agree token
for token.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from .automaton import DONE, Configs, CopyAutomaton
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
    """The options a decoding call has met, as rows of padded tensors (ids, their number,
    bracket flags, text_mass flag, bracket pair), so that a pass gathers its positions'
    legal tokens with one index instead of building tensors from lists (a third of the
    verification's time went to that)."""

    def __init__(self) -> None:
        import torch

        self.row_of: Dict[_Options, int] = {}
        self.pairs: List[Tuple[str, str]] = []
        self.ids = torch.zeros((0, 1), dtype=torch.long)
        self.is_bracket = torch.zeros((0, 1), dtype=torch.bool)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.weigh = torch.zeros(0, dtype=torch.bool)
        self.pair = torch.zeros(0, dtype=torch.long)

    def rows(self, options: Sequence[_Options]) -> Any:
        """The table rows of ``options`` (added when new), as an index tensor."""
        import torch

        found = [self.row_of.get(o, -1) for o in options]
        new = list(dict.fromkeys(o for o, r in zip(options, found) if r < 0))
        if new:
            self._add(new)
            found = [self.row_of[o] for o in options]
        return torch.tensor(found, dtype=torch.long)

    def _add(self, new: List[_Options]) -> None:
        import torch

        width = max(self.ids.shape[1], max(len(o.ids) for o in new))
        for pair in {o.brackets for o in new} - set(self.pairs):
            self.pairs.append(pair)
        ids = torch.tensor([o.ids + o.ids[:1] * (width - len(o.ids)) for o in new], dtype=torch.long)
        flags = torch.tensor([o.is_bracket + [False] * (width - len(o.ids)) for o in new], dtype=torch.bool)
        old = self.ids.shape[1]
        if width > old:  # pad the rows so far: repeat their first id, not a bracket
            self.ids = torch.cat([self.ids, self.ids[:, :1].expand(-1, width - old)], dim=1)
            self.is_bracket = torch.cat([self.is_bracket, self.is_bracket.new_zeros((len(self.row_of), width - old))], 1)
        self.ids = torch.cat([self.ids, ids])
        self.is_bracket = torch.cat([self.is_bracket, flags])
        self.lengths = torch.cat([self.lengths, torch.tensor([len(o.ids) for o in new], dtype=torch.long)])
        self.weigh = torch.cat([self.weigh, torch.tensor([o.weigh for o in new], dtype=torch.bool)])
        self.pair = torch.cat([self.pair, torch.tensor([self.pairs.index(o.brackets) for o in new])])
        for o in new:
            self.row_of[o] = len(self.row_of)


def _verify(
    logits: Any, options: Sequence[_Options], index: VocabIndex, table: _OptionTable
) -> Tuple[List[int], List[float]]:
    """The constrained choice and its raw log-softmax at every selected position at once
    (``logits`` [positions, vocab]; ``options``: each position's legal tokens, looked up
    in ``table``), in a few tensor operations per pass; per token Python only compares ids.

    Plain rule: the argmax over the allowed tokens (ties: lowest id). With
    ``constraint.text_mass`` the allowed tokens that start with a bracket compete with the
    summed probability of every token that does not (the model's "no bracket here"); the
    winning side's best allowed token is taken. A choice depends on its position's logits
    only, so it is the same whether the position was computed alone or in a draft.
    Returns the chosen token ids and their log-probabilities."""
    import torch

    if not len(options):
        return [], []
    flat = logits.float()  # the same tensor when already float32
    device = flat.device
    _bias_open_brackets(flat, options, index)
    rows = table.rows(options)
    lengths = table.lengths[rows]
    k_max = int(lengths.max())
    ids, is_bracket = table.ids[rows, :k_max].to(device), table.is_bracket[rows, :k_max].to(device)
    valid = (torch.arange(k_max)[None, :] < lengths[:, None]).to(device)
    logp = torch.log_softmax(flat, dim=-1)  # one fused pass; the argmax stays on the logits
    values, value_logp = flat.gather(1, ids), logp.gather(1, ids)
    weigh = table.weigh[rows].to(device)
    if bool(weigh.any()):
        # log of the summed probability of all text tokens: log(1 - P(brackets))
        pair = table.pair[rows]
        bracket_logp = torch.full_like(logp[:, 0], float("-inf"))
        for k, brackets in enumerate(table.pairs):
            members = torch.nonzero(pair == k).flatten().to(device)
            bracket_ids = index.bracket_tensor(*brackets, flat)
            if len(members) and len(bracket_ids):
                bracket_logp[members] = torch.logsumexp(logp.index_select(1, bracket_ids).index_select(0, members), -1)
        text = torch.log(-torch.expm1(bracket_logp.clamp(max=0.0)))
        best_bracket = value_logp.masked_fill(~(valid & is_bracket), float("-inf")).max(dim=-1).values
        side = torch.where((text >= best_bracket)[:, None], ~is_bracket, is_bracket)
        valid = valid & torch.where(weigh[:, None], side, torch.ones_like(side))
    best = values.masked_fill(~valid, float("-inf")).argmax(dim=-1, keepdim=True)  # first maximum
    return ids.gather(1, best)[:, 0].tolist(), value_logp.gather(1, best)[:, 0].tolist()


def _bias_open_brackets(logits: Any, options: Sequence[_Options], index: VocabIndex) -> None:
    """Add each position's ``open_bias`` to the logits of the tokens that open a bracket,
    in place, before any choice is made (so speculative and plain decoding see the same
    scores and stay identical)."""
    for n, o in enumerate(options):
        if o.open_bias:
            logits[n, index.ids_starting_with(o.brackets[0].encode("utf8"))] += o.open_bias
