"""The decode loop: rows of many texts streamed through one continuous batch, each pass
verifying every row's draft, and the entries that run it (:func:`decode_constrained`,
:func:`generate_constrained`).

This module only schedules: which rows are in a pass, what each feeds, what each keeps.
The cache is :mod:`.batch`'s, the legal tokens and the choice :mod:`.options`', the
drafts :mod:`.drafts`'.
"""
import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

from ...types import CopyConstraint
from .automaton import Configs, CopyAutomaton
from .batch import _Batch, _common_prefix, _Prefix, shared_prefix_groups
from .drafts import DraftCache, _draft_tokens
from .options import _Options, _options, _OptionTable
from .results import DecodedRow, DecodeStats
from .transfer import Payload, to_host
from .vocab import VocabIndex, vocab_index

MIN_DRAFT = 4
SPAN_DRAFT = 2  # draft tokens inside an open bracket: its close comes within a few tokens
# (row indices, shared prompt length) of one text: :func:`~.batch.shared_prefix_groups`
_Unit = Tuple[List[int], int]


@dataclass(frozen=True)
class StreamSettings:
    """How a decoding call batches and speculates: ``speculative`` feeds drafts of at most
    ``max_draft`` tokens; at most ``batch_size`` rows are in a model call."""

    speculative: bool
    max_draft: int
    batch_size: int


@dataclass(frozen=True, eq=False)
class _DecodeContext:
    """What one decoding call decodes with: the model, its tokenizer and vocabulary index,
    the end token ids (ascending) and the padding id."""

    model: Any
    tokenizer: Any
    index: VocabIndex
    eos_ids: List[int]
    pad_id: int


@dataclass
class _Row:
    """Decoding state of one prompt: ``pending`` are tokens decided but not yet in the
    cache (the prompt, then the last chosen token), ``pos`` the position of the first."""

    automaton: CopyAutomaton
    configs: Configs
    pending: List[int]
    max_new: int
    pos: int = 0
    out: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    passes: int = 0
    done: bool = False
    draft_len: int = 0


@dataclass
class _Plan:
    """What one row verifies in a pass: its ``draft`` fed from block column ``start`` on.
    ``options[k]`` are the legal tokens before the k-th position: one position per draft
    token and one more for the model's own token after the draft (none after EOS)."""

    start: int
    draft: List[int]
    options: List[_Options]


def _plan(index: VocabIndex, row: _Row, draft: List[int], start: int, eos_ids: Sequence[int]) -> _Plan:
    """Walk the row's automaton along its draft (cut where a draft token is not legal)."""
    configs, options = row.configs, []
    for k, token in enumerate(draft):
        options.append(_options(index, row.automaton, configs, eos_ids))
        nxt = options[-1].after.get(token)
        if nxt is None:
            return _Plan(start, draft[:k], options)
        if token in eos_ids:
            return _Plan(start, draft[: k + 1], options)
        configs = nxt
    options.append(_options(index, row.automaton, configs, eos_ids))
    return _Plan(start, draft, options)


@dataclass
class _Group:
    """Rows of one text and the part of their prompt they share (the sentence): it is run
    once, on one cache row (``pending`` is what is not in the cache yet, from ``pos``),
    whose keys/values then seed every member."""

    members: List[_Row]
    pending: List[int]
    pos: int
    passes: int = 0


class _Stream:
    """The continuous batch of one decoding call: at most ``capacity`` rows per pass.

    With drafts, rows leave the batch when they finish and others take their slots in
    the next pass, so the tail of a row with many brackets runs alongside the next texts
    instead of in passes of its own. A text's shared prompt part is computed once on one
    slot and kept; its rows then join one by one. Prompt tokens ride along in passes
    that verify other rows' drafts, in chunks no wider than a draft: the batch is padded
    to its widest block, so a long prompt would make every row pay for its length."""

    def __init__(
        self,
        context: _DecodeContext,
        settings: StreamSettings,
        prompts: Sequence[Sequence[int]],
        rows: List[_Row],
        units: Sequence[_Unit],
        prefix: Optional[_Prefix],
        stats: DecodeStats,
    ) -> None:
        self.tokenizer, self.index, self.eos_ids = context.tokenizer, context.index, context.eos_ids
        self.prompts, self.rows, self.stats = prompts, rows, stats
        self.speculative, self.max_draft, self.capacity = settings.speculative, settings.max_draft, settings.batch_size
        self.prefix = prefix
        self.top = prefix.length if prefix is not None else 0
        self.queue = deque(units)  # (row indices, shared prompt length) per text
        self.ready: Deque[Tuple[_Row, Optional[_Prefix]]] = deque()  # rows whose prompt prefix is cached
        self.live: List[Optional[Union[_Row, _Group]]] = []  # per cache row (None: its row left)
        self.batch = _Batch(context.model, context.pad_id)
        self.draft_cache: DraftCache = {}
        self.table = _OptionTable()
        # per forced prefix (one entity type's rows): [brackets, tokens] they chose so far
        self.bracket_rate: Dict[str, List[int]] = {}

    def run(self) -> None:
        while self.queue or self.live or self.ready:
            self._admit()
            self._step()

    def _admit(self) -> None:
        """Fill free slots: rows whose prompt prefix is computed first, then the next
        text (its group takes one slot, or its rows queue as ready). Without drafts a
        pass is one token wide and a joining prompt would widen it for every row, so
        rows then join only an empty batch (fixed batches)."""
        joining: List[Union[_Row, _Group]] = []
        seeds: List[Optional[_Prefix]] = []
        occupied = sum(x is not None for x in self.live)
        open_to_join = self.speculative or not occupied
        while open_to_join:
            while self.ready and occupied + len(joining) < self.capacity:
                row, seed = self.ready.popleft()
                joining.append(row)
                seeds.append(seed)
            slots = occupied + len(joining)
            waiting = len(self.ready) + sum(len(x.members) for x in self.live + joining if isinstance(x, _Group))
            if not self.queue or slots >= self.capacity or waiting >= self.capacity:
                break
            members, shared = self.queue.popleft()
            for r in members:
                row = self.rows[r]
                row.pos, row.pending = self.top, list(self.prompts[r][self.top :])
                row.passes = int(self.prefix is not None)  # the common prefix's pass served it
            if len(members) > 1 and shared > self.top:
                group_prompt = self.prompts[members[0]][self.top : shared]
                joining.append(_Group([self.rows[r] for r in members], list(group_prompt), self.top))
                seeds.append(self.prefix)
            else:
                self.ready.extend((self.rows[r], self.prefix) for r in members)
        # joining rows take the batch rows of rows that left, then new ones
        free = [r for r, x in enumerate(self.live) if x is None]
        for r, x, seed in zip(free, joining, seeds):
            self.batch.seed(r, seed)
            self.live[r] = x
        self.batch.add_rows(seeds[len(free) :])
        self.live += joining[len(free) :]
        if len(free) > len(joining):
            rows = [r for r, x in enumerate(self.live) if x is not None]
            self.batch.select_rows(rows)
            self.live = [self.live[r] for r in rows]

    def _step(self) -> None:
        """One pass: rows whose prompt is in the cache but for one token verify a draft;
        the others (and groups) feed prompt tokens, at most one draft's width when some
        row verifies, all of them otherwise."""
        live, index = self.live, self.index
        chunk = 1 + self.max_draft
        if not any(isinstance(x, _Row) and len(x.pending) <= chunk for x in live):
            chunk = max(len(x.pending) for x in live)
        verifying = [isinstance(x, _Row) and len(x.pending) <= chunk for x in live]
        # per verifying row its own draft length (the model's recent agreement with the
        # drafts): the pass is packed, so a shorter draft saves positions, not padding
        plans = [
            _plan(index, x, self._draft(x, min(x.draft_len, chunk - len(x.pending))), len(x.pending) - 1, self.eos_ids)
            if v
            else None
            for x, v in zip(live, verifying)
        ]
        blocks = [x.pending + plan.draft if plan else x.pending[:chunk] for x, plan in zip(live, plans)]
        select = [(r, plan.start + k) for r, plan in enumerate(plans) if plan for k in range(len(plan.options))]
        options = [o for plan in plans if plan for o in plan.options]
        payload = Payload()
        staged = self.table.stage(options, payload) if options else None
        logits, sent = self.batch.forward(blocks, [x.pos for x in live], select, payload, self.stats)
        chosen: List[int] = []
        logprobs: List[float] = []
        if staged is not None:  # the pass's one transfer back: the choices
            chosen_ids, logprobs = to_host(staged.choose(logits, sent, index))
            chosen = [int(t) for t in chosen_ids]
        self.stats.forward_passes += 1
        at, kept_new = 0, []  # per batch row: columns of this pass it keeps, None: it left
        for r, (x, plan) in enumerate(zip(live, plans)):
            x.passes += 1
            if isinstance(x, _Group) or not x.out:  # the block starts with prompt tokens
                self.stats.prefill_tokens += len(blocks[r]) if plan is None else len(x.pending)
            if plan is None:
                fed = len(blocks[r])
                x.pos, x.pending = x.pos + fed, x.pending[fed:]
                if isinstance(x, _Group) and not x.pending:  # the shared part is in: its rows are ready
                    shared_kv = self.batch.extract(r)
                    for row in x.members:
                        row.pos, row.pending = x.pos, row.pending[x.pos - self.top :]
                        row.passes += x.passes
                        self.ready.append((row, shared_kv))
                    kept_new.append(None)
                else:
                    kept_new.append(fed)
                continue
            n = len(plan.options)
            accepted = self._accept(x, plan, chosen[at : at + n], logprobs[at : at + n])
            at += n
            if x.done:
                kept_new.append(None)
                continue
            kept_new.append(len(x.pending) + accepted)
            x.pos += len(x.pending) + accepted
            x.pending = [x.out[-1]]
        self.batch.keep(kept_new)
        left = [n is None for n in kept_new]
        self.live = [] if all(left) else [None if gone else x for x, gone in zip(live, left)]

    def _draft(self, row: _Row, room: int) -> List[int]:
        """The row's draft, at most ``room`` tokens. Draft tokens after a bracket the model
        then writes are computed in vain, so where a bracket is likely the draft is short:
        inside an open bracket (the close is near) and, for a row's first draft, as long
        as the rows of its type have gone between brackets so far in this call."""
        if not self.speculative or room <= 0:
            return []
        if not row.out:
            brackets, tokens = self.bracket_rate.get(row.automaton.constraint.forced_prefix, (0, 0))
            room = min(room, max(MIN_DRAFT, (tokens + 1) // (brackets + 1)))
        elif row.automaton.in_span(row.configs):
            room = min(room, SPAN_DRAFT)
        return _draft_tokens(self.index, self.tokenizer, row, room, self.eos_ids[0], self.draft_cache)

    def _accept(self, row: _Row, plan: _Plan, chosen: List[int], logprobs: List[float]) -> int:
        """Take the choices along the draft up to the first one that differs from it
        (that one included); returns how many draft tokens were accepted."""
        accepted, before = 0, len(row.out)
        for k, (token, logprob) in enumerate(zip(chosen, logprobs)):
            row.out.append(token)
            row.logprobs.append(logprob)
            row.configs = plan.options[k].after[token]
            if token in self.eos_ids or len(row.out) >= row.max_new:
                row.done = True
                break
            if k < len(plan.draft) and plan.draft[k] == token:
                accepted += 1  # its keys/values are already in the cache
                continue
            break
        self.stats.draft_tokens += len(plan.draft)
        self.stats.accepted_tokens += accepted
        c = row.automaton.constraint
        rate = self.bracket_rate.setdefault(c.forced_prefix, [0, 0])
        brackets = self.index.bracket_ids(c.open, c.close)
        rate[0] += sum(t in brackets for t in row.out[before:])
        rate[1] += len(row.out) - before
        # Adapt the draft to how far the model follows the source (it only costs compute):
        # twice the accepted run, shrinking at most by half per pass, so one bracket does
        # not cut the draft of a model that otherwise copies.
        row.draft_len = min(self.max_draft, max(MIN_DRAFT, 2 * (accepted + 1), row.draft_len // 2))
        return accepted


def _decode_stream(
    context: _DecodeContext,
    settings: StreamSettings,
    prompts: Sequence[Sequence[int]],
    constraints: Sequence[CopyConstraint],
    max_new: Sequence[int],
    units: Sequence[_Unit],
    prefix: Optional[_Prefix],
    stats: DecodeStats,
) -> List[_Row]:
    """Decode all rows (:class:`_Stream`); ``units``: (row indices, shared prompt length)
    per text. Returns the rows' ``_Row`` records in order."""
    max_draft = settings.max_draft
    shared_options: Dict[CopyConstraint, Dict[Configs, _Options]] = {}
    automata = {
        c: CopyAutomaton(c, shared_options.setdefault(dataclasses.replace(c, forced_prefix=""), {}))
        for c in set(constraints)
    }
    rows = [
        _Row(automaton=automata[c], configs=automata[c].initial, pending=[], max_new=m, draft_len=max_draft)
        for c, m in zip(constraints, max_new)
    ]
    _Stream(context, settings, prompts, rows, units, prefix, stats).run()
    return rows


def decode_constrained(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    constraints: Sequence[CopyConstraint],
    *,
    eos_token_ids: Sequence[int],
    max_new_tokens: Optional[Sequence[int]] = None,
    speculative: bool = True,
    share_prefix: bool = True,
    max_draft: int = 32,
    batch_size: int = 64,
    stats: Optional[DecodeStats] = None,
) -> List[DecodedRow]:
    """Constrained greedy decoding of ``prompts`` (token ids), one constraint per prompt.

    ``speculative`` feeds the rest of the answer as a draft (at most ``max_draft`` tokens)
    and keeps exactly what greedy would produce: the output is the same with it off.
    ``share_prefix`` runs the common prompt prefix of consecutive rows once (keep the rows
    of one text adjacent). At most ``batch_size`` rows are in a model call; with drafts
    the batch is refilled as rows finish. The constraint bounds the answer length by
    itself; ``max_new_tokens`` (per row, default unbounded) only cuts it.
    """
    import torch

    if len(prompts) != len(constraints):
        raise ValueError(f"{len(prompts)} prompts but {len(constraints)} constraints")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token.")
    if not eos_token_ids:
        raise ValueError("Constrained decoding needs at least one end token id.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    stats = stats if stats is not None else DecodeStats()
    max_new = list(max_new_tokens) if max_new_tokens is not None else [1 << 30] * len(prompts)
    index = vocab_index(tokenizer)
    eos_ids = sorted(set(eos_token_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    results: List[Optional[DecodedRow]] = [None] * len(prompts)
    todo = [r for r in range(len(prompts)) if max_new[r] > 0]
    for r in range(len(prompts)):
        if max_new[r] <= 0:
            results[r] = DecodedRow(text="", token_ids=[], logprobs=[], forward_passes=0, finished=False)
    with torch.inference_mode():
        todo_prompts = [prompts[r] for r in todo]
        prefix = None
        if share_prefix:  # the rows of one text form a unit; the prefix all share is run once
            start = time.perf_counter()
            units = shared_prefix_groups(todo_prompts, [constraints[r].source for r in todo])
            prefix = _common_prefix(model, pad_id, todo_prompts, units, stats)
            stats.seconds += time.perf_counter() - start
        else:
            units = [([k], 0) for k in range(len(todo))]
        start = time.perf_counter()
        rows = _decode_stream(
            _DecodeContext(model, tokenizer, index, eos_ids, pad_id),
            StreamSettings(speculative=speculative, max_draft=max_draft, batch_size=batch_size),
            todo_prompts,
            [constraints[r] for r in todo],
            [max_new[r] for r in todo],
            units,
            prefix,
            stats,
        )
        seconds = time.perf_counter() - start
        stats.seconds += seconds
        for r, row in zip(todo, rows):
            data = b"".join(index.bytes_of.get(t, b"") for t in row.out if t not in eos_ids)
            stats.generated_tokens += len(row.out)
            stats.prompt_tokens += len(prompts[r])
            results[r] = DecodedRow(
                text=data.decode("utf-8", errors="replace"),
                token_ids=row.out,
                logprobs=row.logprobs,
                forward_passes=row.passes,
                finished=bool(row.out) and row.out[-1] in eos_ids,
                seconds=seconds / len(rows),
            )
    return results  # type: ignore[return-value]


def generate_constrained(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    constraints: Sequence[CopyConstraint],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: Sequence[int],
    batch_size: int = 8,
    speculative: bool = True,
    share_prefix: bool = True,
    max_draft: int = 32,
) -> List[DecodedRow]:
    """The runtime entry: :func:`decode_constrained` with the runtime's settings, for
    prompts already encoded (``stop_ids``: the ids that end an answer).

    :class:`~..generation.HFGenerator` calls it for requests that carry a constraint and
    turns the rows into its results. Keep the prompts of one text adjacent so their
    shared prompt prefix is computed once; ``batch_size`` bounds the rows of a model
    call. ``max_new_tokens`` (per prompt) only cuts an answer: the constraint bounds its
    length.
    """
    return decode_constrained(
        model,
        tokenizer,
        prompts,
        constraints,
        eos_token_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        speculative=speculative,
        share_prefix=share_prefix,
        max_draft=max_draft,
        batch_size=batch_size,
    )
