"""The KV cache of a batch as one tensor for all layers.

Rows join, leave and are compacted between passes; with a cache per layer each of those is
a loop over the layers (and a pass appends by concatenation, a copy of the whole cache per
layer). Here keys and values of every layer are one tensor, so moving rows or columns is
one operation whatever the depth, and a pass writes its new keys/values in place.
"""
from functools import lru_cache
from typing import Any, Sequence, Tuple


class KVStore:
    """Keys and values ``data`` [layers, 2, rows, kv heads, capacity, head dim], of which
    the first ``columns`` are in use. During a pass the layers write the new tokens at
    ``slots`` (row and column index per packed token) and see columns up to ``end``;
    ``rows`` sizes the store when the first pass allocates it."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.rows = 0
        self.data: Any = None
        self.columns = 0
        self.end = 0
        self.slots: Tuple[Any, Any] = (None, None)

    def allocate(self, like: Any, rows: int, capacity: int) -> None:
        """Zeros (masked columns must hold finite values) shaped after ``like``'s heads,
        head dim, dtype and device."""
        heads, dim = like.shape[-3], like.shape[-1]
        self.data = like.new_zeros((self.layers, 2, rows, heads, capacity, dim))

    def reserve(self, columns: int) -> None:
        """Room for ``columns`` columns (the capacity doubles, so growing is rare)."""
        if self.data is None or columns <= self.data.shape[4]:
            return
        grown = self.data.new_zeros(self.data.shape[:4] + (max(columns, 2 * self.data.shape[4]),) + self.data.shape[5:])
        grown[:, :, :, :, : self.data.shape[4]] = self.data
        self.data = grown

    def add_rows(self, rows: int) -> None:
        import torch

        if self.data is not None:
            shape = self.data.shape[:2] + (rows,) + self.data.shape[3:]
            self.data = torch.cat([self.data, self.data.new_zeros(shape)], dim=2)

    def take_rows(self, runs: Sequence[Tuple[int, int]]) -> None:
        """Keep the rows of ``runs`` (consecutive [start, end) ranges), in order."""
        import torch

        if self.data is None:
            return
        if len(runs) == 1:  # rows left at the ends only: a view, no copy
            self.data = self.data[:, :, runs[0][0] : runs[0][1]]
        else:
            self.data = torch.cat([self.data[:, :, a:b] for a, b in runs], dim=2)

    def gather_columns(self, cols: Any) -> None:
        """Per row the columns ``cols`` [rows, T] (a device tensor), in one gather."""
        data = self.data
        index = cols[None, None, :, None, :, None].expand(data.shape[:4] + (cols.shape[1],) + data.shape[5:])
        self.data = data.gather(4, index)

    def seed(self, row: int, kv: Any) -> None:
        """Write a prefix's keys/values [layers, 2, kv heads, length, head dim] at the start of ``row``."""
        self.data[:, :, row, :, : kv.shape[3]] = kv

    def extract(self, row: int, runs: Sequence[Tuple[int, int]]) -> Any:
        """Row ``row``'s columns in ``runs`` as one prefix [layers, 2, kv heads, length, head dim]."""
        import torch

        return torch.cat([self.data[:, :, row, :, a:b] for a, b in runs], dim=3)

    def write(self, layer: int, keys: Any, values: Any) -> Tuple[Any, Any]:
        """One layer's new keys/values of a packed pass ([1, kv heads, tokens, head dim])
        written at ``slots``; returns the layer's keys/values up to ``end``."""
        if self.data is None:
            self.allocate(keys, self.rows, 2 * self.end)
        rows, cols = self.slots
        self.data[layer, 0][rows, :, cols] = keys[0].transpose(0, 1)
        self.data[layer, 1][rows, :, cols] = values[0].transpose(0, 1)
        return self.data[layer, 0, :, :, : self.end], self.data[layer, 1, :, :, : self.end]


@lru_cache(maxsize=1)
def _store_layer() -> type:
    """The cache layer class that is one layer's view of a :class:`KVStore`, behind
    transformers' cache interface (made on first use: importing this package does not
    import transformers)."""
    from transformers.cache_utils import DynamicLayer

    class StoreLayer(DynamicLayer):
        def __init__(self, store: KVStore, layer: int) -> None:
            super().__init__()
            self.store, self.layer = store, layer
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Tuple[Any, Any]:
            return self.store.write(self.layer, key_states, value_states)

        def get_seq_length(self) -> int:
            return self.store.columns

    return StoreLayer


def store_cache(model_config: Any) -> Tuple[KVStore, Any]:
    """A store and the cache object a model writes into it; refused here, before any pass,
    when the model's layers are not full-attention ones (rows are moved and cut in place)."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    for layer in DynamicCache(config=model_config).layers:
        if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
            raise NotImplementedError(
                f"Constrained decoding needs a full-attention dynamic KV cache, got {type(layer).__name__}."
            )
    store = KVStore(model_config.num_hidden_layers)
    layers = [_store_layer()(store, k) for k in range(store.layers)]
    return store, Cache(layers=layers)
