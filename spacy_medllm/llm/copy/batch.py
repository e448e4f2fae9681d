"""The rows of a batch that advance at different speeds, and the model pass over them.

Everything that touches the model's cache and modules lives here: the cache
(:mod:`.kvstore`, one tensor for all layers) with explicit positions and a host-side mask
per row (rows join, leave and are compacted in place), the prompt prefix shared by several
rows, and the pass itself: the rows' blocks packed into one sequence of real tokens
(:mod:`.attention`), the output layer on the verified positions only. Everything a pass
needs on the device travels in one :class:`~.transfer.Payload`; cache operations that
need a device index wait for it.
"""
import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..peft_model import unwrap_peft
from .attention import PassLayout, packed_pass
from .kvstore import store_cache
from .results import DecodeStats
from .transfer import Payload

MIN_SHARED = 4  # shorter common prefixes are not worth a separate pass


class _Batch:
    """One KV cache for several rows, with a validity mask over its columns.

    Rows advance by different numbers of tokens per pass, so positions are given per row;
    rejected columns are masked and then dropped. A row that leaves keeps its cache row
    until a joining row takes it (:meth:`seed`) or nobody does (:meth:`select_rows`). The
    mask is the host's (it decides every change); the device gets it with each pass."""

    def __init__(self, model: Any, pad_id: int) -> None:
        if len(set(getattr(unwrap_peft(model), "hf_device_map", {}).values())) > 1:
            raise NotImplementedError(
                "Constrained decoding keeps the KV cache of all layers in one tensor: "
                "load the model on one device (no device_map across devices)."
            )
        self.model = model
        self.pad_id = pad_id
        self.head = _plain_head(model)
        self.config = unwrap_peft(model).config
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters
        self._reset()
        self.last_width = 0

    def _reset(self) -> None:
        """An empty batch: no rows, a new cache (refused here, before any pass, when its
        layers are not full-attention ones)."""
        import torch

        self.store, self.cache = store_cache(self.config)
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        # cache operations waiting for a device index (a compaction) and those queued behind it
        self.deferred: List[Tuple[Callable[[Any], None], Optional[Any]]] = []

    def _defer(self, op: Callable[[Any], None], data: Optional[Any] = None) -> None:
        """Run ``op`` on the store now, or after the operations waiting for the next
        payload; ``data`` (a host index) travels in that payload and is ``op``'s argument."""
        if data is None and not self.deferred:
            op(None)
        else:
            self.deferred.append((op, data))

    def forward(
        self,
        blocks: Sequence[Sequence[int]],
        starts: Sequence[int],
        select: Sequence[Tuple[int, int]],
        payload: Payload,
        stats: DecodeStats,
    ) -> Tuple[Any, List[Any]]:
        """One pass on a block of tokens per row (row r's first token at position
        ``starts[r]``), the blocks packed into one sequence; returns the logits
        [len(select), vocab] at the (row, block column) pairs of ``select`` (None when
        nothing is selected: a prefill) and the device parts of ``payload``, which is
        sent here with the pass's own inputs: one transfer.

        The output layer runs on the selected positions only where the model's logits are
        plainly its output layer on the last hidden state (:func:`_plain_head`): over a
        large vocabulary it costs as much as the layers below."""
        import torch

        rows, width, columns = len(blocks), max(1, max(len(b) for b in blocks)), self.mask.shape[1]
        lengths = torch.tensor([len(b) for b in blocks])
        valid = torch.arange(width)[None, :] < lengths[:, None]
        mask = torch.cat([self.mask, valid.long()], dim=1)
        offsets = [0]
        for b in blocks:
            offsets.append(offsets[-1] + len(b))
        parts = (
            payload.add([t for b in blocks for t in b]),
            payload.add([s + j for s, b in zip(starts, blocks) for j in range(len(b))]),
            payload.add(valid.flatten().nonzero().flatten()),
            payload.add(mask),
            payload.add([offsets[r] + c for r, c in select]),
        )
        waiting = [(op, payload.add(data) if data is not None else None) for op, data in self.deferred]
        sent = payload.send(self.model.device)
        for op, part in waiting:
            op(sent[part] if part is not None else None)
        self.deferred = []
        ids, positions, index, device_mask, selected = (sent[k] for k in parts)
        store = self.store
        store.rows, store.end = rows, columns + width
        store.reserve(store.end)
        store.slots = (index // width, index % width + columns)
        causal = torch.arange(columns + width, device=index.device)[None, :] <= columns + torch.arange(
            width, device=index.device
        )[:, None]
        allowed = device_mask.view(rows, columns + width).bool()[:, None, :] & causal[None]
        inputs = {"input_ids": ids[None], "position_ids": positions[None], "cache": self.cache, "use_cache": True}
        with packed_pass(self.config, PassLayout(index, rows, width, allowed)):
            if self.head is not None:
                decoder, output_layer = self.head
                hidden = decoder(**inputs).last_hidden_state
                logits = output_layer(hidden[0, selected]) if select else None
            else:
                keep = len(ids) - min(offsets[r] + c for r, c in select) if select else 1
                out = self.model(**inputs, **({"logits_to_keep": keep} if self.takes_logits_to_keep else {}))
                logits = out.logits[0, selected - (len(ids) - out.logits.shape[1])] if select else None
        stats.positions += len(ids)
        stats.key_columns += rows * columns
        stats.hole_columns += rows * columns - int(self.mask.sum())
        self.mask = mask
        store.columns = columns + width
        self.last_width = width
        return logits, sent

    def add_rows(self, seeds: Sequence[Optional["_Prefix"]]) -> None:
        """Append one row per seed, holding that cached prefix (the prompt part common to
        every row, or a text's shared part) or nothing: rows join a running batch when no
        row has left to make room (:meth:`seed` reuses one)."""
        import torch

        if not seeds:
            return
        before, width = self.mask.shape
        self.mask = torch.cat([self.mask, self.mask.new_zeros((len(seeds), width))])
        reference = next((seed.kv for seed in seeds if seed is not None), None)
        store = self.store
        if store.data is None and not self.deferred:  # nothing cached yet
            if reference is None:
                return  # the first pass creates the cache for every row
            store.allocate(reference, before, width)
        self._defer(lambda _: store.add_rows(len(seeds)))
        longest = max([seed.length for seed in seeds if seed is not None], default=0)
        if longest > width:
            self._widen(longest)
        for k, seed in enumerate(seeds):
            self.seed(before + k, seed)

    def extract(self, row: int) -> "_Prefix":
        """The keys/values of batch row ``row``'s valid columns, in order: a text's shared
        prompt part, to seed its rows with."""
        cols = self.mask[row].nonzero().flatten().tolist()
        return _Prefix(len(cols), self.store.extract(row, _runs(cols)))

    def seed(self, row: int, seed: Optional["_Prefix"]) -> None:
        """Give batch row ``row``, whose row has left, to a joining row holding ``seed``:
        the old columns are masked and the seed written over the first ones in place,
        instead of appending a row (a copy of the whole cache) and dropping the old one
        (another)."""
        self.mask[row] = 0
        if seed is None:
            return
        if seed.length > self.mask.shape[1]:
            self._widen(seed.length)
        self.mask[row, : seed.length] = 1
        store = self.store
        self._defer(lambda _: store.seed(row, seed.kv))

    def _widen(self, width: int) -> None:
        """Columns up to ``width`` (the new ones masked)."""
        self.mask = _with_zero_columns(self.mask, width - self.mask.shape[1])
        store = self.store
        store.columns = width
        self._defer(lambda _: store.reserve(width))

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep batch rows ``rows`` only, in that order (rows left and nobody took them)."""
        import torch

        if not rows:
            self._reset()
            return
        self.mask = self.mask[torch.tensor(list(rows), dtype=torch.long)]
        store = self.store
        self._defer(lambda _: store.take_rows(_runs(rows)))

    def keep(self, kept_new: Sequence[Optional[int]]) -> None:
        """Of the columns of the last pass keep the first ``kept_new[r]`` for batch row r;
        None: the row left (its columns are masked, the row waits for :meth:`seed` or
        :meth:`select_rows`).

        Columns no row uses any more are cropped from the end (cheap); the cache is only
        re-gathered when masked holes would waste a quarter of it, with the next pass
        (its index travels in that pass's payload)."""
        import torch

        if all(n is None for n in kept_new):
            self._reset()
            return
        mask = self.mask
        for r, n in enumerate(kept_new):
            mask[r, mask.shape[1] - self.last_width + n if n is not None else 0 :] = 0
        counts = mask.sum(dim=1)
        used = torch.nonzero(mask.any(dim=0)).flatten()
        end = int(used[-1]) + 1 if len(used) else 0
        if end - int(counts.max()) < max(32, end // 4):
            self.store.columns = end
            self.mask = mask[:, :end]
            return
        new_len = int(counts.max())
        # Valid columns first, in order; padding points at column 0 (masked anyway).
        order = torch.argsort(1 - mask, dim=1, stable=True)[:, :new_len]
        arange = torch.arange(new_len)[None, :]
        cols = torch.where(arange < counts[:, None], order, torch.zeros_like(order))
        self.mask = (arange < counts[:, None]).long()
        store = self.store
        store.columns = new_len
        rows = len(cols)
        self._defer(lambda sent: store.gather_columns(sent.view(rows, new_len)), cols)


def _runs(items: Sequence[int]) -> List[Tuple[int, int]]:
    """Ascending-consecutive stretches of ``items`` as [start, end) ranges, in order."""
    runs: List[Tuple[int, int]] = []
    for i in items:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _with_zero_columns(tensor: Any, columns: int) -> Any:
    """``tensor`` with ``columns`` zero columns appended on its sequence axis (the last
    for a mask [rows, columns], the third for keys/values [rows, heads, columns, dim])."""
    import torch

    axis = 1 if tensor.dim() == 2 else 2
    shape = list(tensor.shape)
    shape[axis] = columns
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)


# Causal LMs whose forward is ``logits = lm_head(model(...).last_hidden_state)``, nothing more
# (no soft-capping or scaling of the logits).
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _plain_head(model: Any) -> Optional[Tuple[Any, Any]]:
    """(decoder, output layer) of a model in ``_PLAIN_HEAD_TYPES`` (a peft model: of its
    base, whose modules carry the adapters), else None: use the model's own forward."""
    base = unwrap_peft(model)
    if getattr(base.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    return base.get_decoder(), base.get_output_embeddings()


def forward_module(model: Any) -> Any:
    """The module every forward path of ``model`` (its forward, ``generate``, the
    constrained decoder's) runs exactly once per pass: the decoder of a model with a
    plain head, else the model (a peft model's base model)."""
    head = _plain_head(model)
    return head[0] if head is not None else unwrap_peft(model)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_groups(
    prompts: Sequence[Sequence[int]], keys: Sequence[Any]
) -> List[Tuple[List[int], int]]:
    """Consecutive rows with the same key (the source text: the per-type prompts of one
    sentence) form a group; returns (row indices, shared token prefix length) per group.

    The shared length stops one token short of each member's prompt, so every row still
    feeds its own last token and gets its own first logits.
    """
    groups: List[Tuple[List[int], int]] = []
    for r, prompt in enumerate(prompts):
        if groups and keys[groups[-1][0][0]] == keys[r]:
            members, shared = groups[-1]
            groups[-1] = (members + [r], min(shared, _lcp(prompts[members[0]], prompt), len(prompt) - 1))
        else:
            groups.append(([r], len(prompt) - 1))
    return groups


@dataclass
class _Prefix:
    """Cached key/values of a prompt prefix (the part common to every row of a call, or
    one text's shared part), computed once and seeded into the rows that start with it."""

    length: int
    kv: Any  # [layers, 2, kv heads, length, head dim]


def _common_prefix(
    model: Any,
    pad_id: int,
    prompts: Sequence[Sequence[int]],
    groups: Sequence[Tuple[List[int], int]],
    stats: DecodeStats,
) -> Optional[_Prefix]:
    """Run the prefix all groups share once (None when shorter than MIN_SHARED)."""
    if len(groups) < 2:
        return None
    heads = [prompts[members[0]] for members, _ in groups]
    top = min(min(n for _, n in groups), min(_lcp(heads[0], h) for h in heads[1:]))
    if top < MIN_SHARED:
        return None
    batch = _Batch(model, pad_id)
    batch.add_rows([None])
    batch.forward([heads[0][:top]], [0], [], Payload(), stats)
    stats.forward_passes += 1
    stats.prefill_tokens += top
    return _Prefix(top, batch.store.data[:, :, 0, :, :top])
