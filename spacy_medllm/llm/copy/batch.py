"""The KV cache of a batch of rows that advance at different speeds, and the model pass
over it.

Everything that touches the model's cache and modules lives here: one cache with explicit
positions and a mask per row (rows join, leave and are compacted in place), the prompt
prefix shared by several rows, and the shortcuts of a pass (the output layer on the
verified positions only, the feed-forward blocks skipping the padding).
"""
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from ..peft_model import unwrap_peft
from .results import DecodeStats

MIN_SHARED = 4  # shorter common prefixes are not worth a separate pass


class _Batch:
    """One KV cache for several rows, with a validity mask over its columns.

    Rows advance by different numbers of tokens per pass, so positions are given per row;
    blocks are right-padded, rejected and padded columns are masked and then dropped. A
    row that leaves keeps its cache row until a joining row takes it (:meth:`seed`) or
    nobody does (:meth:`select_rows`)."""

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.head = _plain_head(model)
        self.mlps = _layer_mlps(self.head[0]) if self.head is not None else []
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters
        self._reset()
        self.last_width = 0

    def _reset(self) -> None:
        """An empty batch: no rows, a new cache (refused here, before any pass, when its
        layers are not full-attention dynamic ones: rows are moved and cut in place)."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.cache = DynamicCache(config=self.model.config)
        for layer in self.cache.layers:
            if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
                raise NotImplementedError(
                    f"Constrained decoding needs a full-attention dynamic KV cache, got {type(layer).__name__}."
                )
        self.mask = torch.zeros((0, 0), dtype=torch.long)

    def forward(
        self,
        blocks: Sequence[Sequence[int]],
        starts: Sequence[int],
        select: Sequence[Tuple[int, int]] = (),
    ) -> Any:
        """One pass on a block of tokens per row (row r's first token at position
        ``starts[r]``); returns the logits [len(select), vocab] at the (row, block column)
        pairs of ``select``, or None when nothing is selected (a prefill).

        The output layer runs on the selected positions only where the model's logits are
        plainly its output layer on the last hidden state (:func:`_plain_head`): over a
        large vocabulary it costs as much as the layers below, and a pass selects about
        two thirds of its positions (the others are padding and prompt chunks). There the
        feed-forward blocks also skip the padding when it is a tenth of the block or more
        (:func:`_packed`; measured 15.0 -> 13.1 ms for a pass of 18 x 33 with a third padded)."""
        import torch

        width = max(1, max(len(b) for b in blocks))
        ids = torch.tensor([list(b) + [self.pad_id] * (width - len(b)) for b in blocks], dtype=torch.long)
        valid = (torch.arange(width)[None, :] < torch.tensor([len(b) for b in blocks])[:, None]).long()
        positions = torch.tensor(list(starts))[:, None] + torch.arange(width)
        mask = torch.cat([self.mask, valid], dim=1)
        device = self.model.device
        inputs = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": positions.to(device),
            "cache": self.cache,
            "use_cache": True,
        }
        rows = torch.tensor([r for r, _ in select], dtype=torch.long, device=device)
        cols = torch.tensor([c for _, c in select], dtype=torch.long, device=device)
        if self.head is not None:
            decoder, output_layer = self.head
            real = valid.flatten().nonzero().flatten()
            packed = _packed(self.mlps, real.to(device)) if len(real) < PACK_BELOW * valid.numel() else nullcontext()
            with packed:
                hidden = decoder(**inputs).last_hidden_state
            logits = output_layer(hidden[rows.to(hidden.device), cols.to(hidden.device)]) if select else None
        else:
            keep = width - int(cols.min()) if select else 1
            out = self.model(**inputs, **({"logits_to_keep": keep} if self.takes_logits_to_keep else {}))
            logits = out.logits[rows, cols - (width - out.logits.shape[1])] if select else None
        self.mask = mask
        self.last_width = width
        return logits

    def add_rows(self, seeds: Sequence[Optional["_Prefix"]]) -> None:
        """Append one row per seed, holding that cached prefix (the prompt part common to
        every row, or a text's shared part) or nothing: rows join a running batch when no
        row has left to make room (:meth:`seed` reuses one)."""
        import torch

        if not seeds:
            return
        before, width, layers = self.mask.shape[0], self.mask.shape[1], self.cache.layers
        self.mask = torch.cat([self.mask, self.mask.new_zeros((len(seeds), width))])
        reference = next((seed.kv for seed in seeds if seed is not None), None)
        if not layers or layers[0].keys is None:  # nothing cached yet
            if reference is None:
                return  # the next pass creates the cache for every row
            for i, (keys, values) in enumerate(reference):
                shape = (before, keys.shape[1], width, keys.shape[3])
                self.cache.update(keys.new_zeros(shape), values.new_zeros(shape), i)
        for layer in layers:
            rows = (len(seeds),) + tuple(layer.keys.shape[1:])
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(rows)])
            layer.values = torch.cat([layer.values, layer.values.new_zeros(rows)])
        longest = max([seed.length for seed in seeds if seed is not None], default=0)
        if longest > width:
            self._widen(longest)
        for k, seed in enumerate(seeds):
            self.seed(before + k, seed)

    def extract(self, row: int) -> "_Prefix":
        """The keys/values of batch row ``row``'s valid columns, in order: a text's shared
        prompt part, to seed its rows with."""
        import torch

        cols = torch.nonzero(self.mask[row]).flatten()
        kv = []
        for layer in self.cache.layers:
            index = cols.to(layer.keys.device)
            kv.append(tuple(part[row : row + 1].index_select(2, index) for part in (layer.keys, layer.values)))
        return _Prefix(len(cols), kv)

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
        for layer, (keys, values) in zip(self.cache.layers, seed.kv):
            layer.keys[row, :, : seed.length] = keys[0]
            layer.values[row, :, : seed.length] = values[0]

    def _widen(self, width: int) -> None:
        grow = width - self.mask.shape[1]
        self.mask = _with_zero_columns(self.mask, grow)
        for layer in self.cache.layers:
            layer.keys, layer.values = _with_zero_columns(layer.keys, grow), _with_zero_columns(layer.values, grow)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep batch rows ``rows`` only, in that order (rows left and nobody took them)."""
        import torch

        if not rows:
            self._reset()
            return
        index = torch.tensor(list(rows), dtype=torch.long)
        self.mask = self.mask[index]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index.to(layer.keys.device)], layer.values[index.to(layer.keys.device)]

    def keep(self, kept_new: Sequence[Optional[int]]) -> None:
        """Of the columns of the last pass keep the first ``kept_new[r]`` for batch row r;
        None: the row left (its columns are masked, the row waits for :meth:`seed` or
        :meth:`select_rows`).

        Columns no row uses any more are cropped from the end (cheap); the cache is only
        re-gathered when masked holes would waste a quarter of it."""
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
            self.cache.crop(end - mask.shape[1])
            self.mask = mask[:, :end]
            return
        new_len = int(counts.max())
        # Valid columns first, in order; padding points at column 0 (masked anyway).
        order = torch.argsort(1 - mask, dim=1, stable=True)[:, :new_len]
        arange = torch.arange(new_len)[None, :]
        cols = torch.where(arange < counts[:, None], order, torch.zeros_like(order))
        self.mask = (arange < counts[:, None]).long()
        _gather_cache(self.cache, cols)


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


PACK_BELOW = 0.9  # share of real (unpadded) positions under which the MLPs skip the padding


def _layer_mlps(decoder: Any) -> List[Any]:
    """The feed-forward block of every decoder layer (``layer.mlp``), or [] if any lacks one."""
    mlps = [getattr(layer, "mlp", None) for layer in getattr(decoder, "layers", [])]
    return mlps if mlps and all(m is not None for m in mlps) else []


@contextmanager
def _packed(mlps: Sequence[Any], real: Any) -> Iterator[None]:
    """Run the feed-forward blocks on the real positions only (``real``: flat indices into
    the [rows, width] block); padded positions get zeros, which nothing attends to. A
    position-wise block gives the same values either way, and it is most of a layer's
    arithmetic: a pass is padded where rows end before the widest one."""
    shapes: List[Any] = []

    def pack(_module: Any, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        hidden = args[0]
        shapes.append(hidden.shape)
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, real),) + tuple(args[1:])

    def unpack(_module: Any, _args: Tuple[Any, ...], out: Any) -> Any:
        rows, width, _ = shapes.pop()
        full = out.new_zeros((rows * width, out.shape[-1])).index_copy_(0, real, out)
        return full.view(rows, width, -1)

    handles = [h for m in mlps for h in (m.register_forward_pre_hook(pack), m.register_forward_hook(unpack))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_module(model: Any) -> Any:
    """The module every forward path of ``model`` (its forward, ``generate``, the
    constrained decoder's) runs exactly once per pass: the decoder of a model with a
    plain head, else the model (a peft model's base model)."""
    head = _plain_head(model)
    return head[0] if head is not None else unwrap_peft(model)


def _gather_cache(cache: Any, cols: Any) -> None:
    """Select per batch row the sequence columns ``cols`` [rows, T'] in place (the
    layers are full-attention dynamic ones: :meth:`_Batch._reset` checks)."""
    for layer in cache.layers:
        keys = layer.keys
        index = cols.to(keys.device)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        layer.keys = keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


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
    kv: List[Tuple[object, object]]


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
    batch.forward([heads[0][:top]], [0])
    stats.forward_passes += 1
    stats.prefill_tokens += top
    return _Prefix(top, [(layer.keys, layer.values) for layer in batch.cache.layers])
