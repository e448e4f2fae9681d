"""Attention of a packed pass.

A pass feeds the rows' blocks as one sequence of real tokens, so the projections and
feed-forward blocks compute no padding; only attention, which needs each row's own cache,
lays the queries out per row again. Grouped query heads then attend to their shared
key/value head directly (the queries of a group are folded onto one head), instead of
transformers' ``repeat_kv``, which copies the whole cache per layer and pass whenever a mask
is given. A pass uses torch's scaled dot-product attention whatever the model's own
attention setting.
"""
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, Iterator, Optional, Tuple

PACKED_ATTENTION = "medllm_packed"


@dataclass
class PassLayout:
    """Where the packed tokens of a pass sit: ``index`` [tokens] their flat position in the
    [rows, width] block, ``allowed`` [rows, width, columns] which cache and block columns
    each position attends to (its row's valid columns, causal within the block)."""

    index: Any
    rows: int
    width: int
    allowed: Any
    calls: int = 0  # attention layers that ran on this layout
    _folded: Dict[int, Any] = field(default_factory=dict)

    def mask(self, groups: int) -> Any:
        """``allowed`` with the query axis repeated per head of a group, as
        :func:`packed_attention` folds the queries (one copy per pass, not per layer)."""
        found = self._folded.get(groups)
        if found is None:
            rows, width, columns = self.allowed.shape
            found = self.allowed[:, None, None].expand(rows, 1, groups, width, columns)
            found = self._folded[groups] = found.reshape(rows, 1, groups * width, columns)
        return found


_ACTIVE = threading.local()


def packed_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> Tuple[Any, None]:
    """Scaled dot-product attention of the packed queries [1, heads, tokens, dim] against
    the rows' keys/values [rows, kv heads, columns, dim]; returns [1, tokens, heads, dim]."""
    import torch

    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        raise NotImplementedError("Constrained decoding supports plain scaled dot-product attention only.")
    layout: PassLayout = _ACTIVE.layout
    layout.calls += 1
    heads, dim, kv_heads = query.shape[1], query.shape[3], key.shape[1]
    groups, rows, width = heads // kv_heads, layout.rows, layout.width
    padded = query.new_zeros((rows * width, heads, dim)).index_copy_(0, layout.index, query[0].transpose(0, 1))
    folded = padded.view(rows, width, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded.reshape(rows, kv_heads, groups * width, dim), key, value, attn_mask=layout.mask(groups), scale=scaling
    )
    out = out.view(rows, kv_heads, groups, width, dim).permute(0, 3, 1, 2, 4).reshape(rows * width, heads, dim)
    return out.index_select(0, layout.index)[None], None


@lru_cache(maxsize=1)
def _register() -> None:
    """Make :func:`packed_attention` an attention implementation transformers can pick
    (on first use: importing this package does not import transformers)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextmanager
def packed_pass(config: Any, layout: PassLayout) -> Iterator[None]:
    """Run the model's attention as :func:`packed_attention` on ``layout`` for one pass
    (the model's own setting is restored after). A model whose attention does not go
    through transformers' attention interface would attend across the packed rows: it is
    refused after its first pass, before any choice is made."""
    _register()
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    _ACTIVE.layout = layout
    try:
        yield
    finally:
        config._attn_implementation = before
        _ACTIVE.layout = None
    if not layout.calls:
        raise NotImplementedError(
            "Constrained decoding needs a model whose attention runs through transformers' "
            "attention interface (ALL_ATTENTION_FUNCTIONS); this one's does not."
        )
