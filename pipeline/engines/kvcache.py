"""A KV cache whose layers append into spare capacity instead of re-concatenating every step.

    from pipeline.engines.kvcache import growable_cache
    cache = growable_cache()            # a transformers Cache; pass it to model(..., cache=cache)

Why: transformers' DynamicLayer appends with ``torch.cat``, which copies the whole layer cache at
every decode step (measured: 46% of CPU time when decoding 48 rows). ``GrowableLayer`` keeps a
buffer with headroom that doubles when full, so an append writes only the new column; eviction
(``batch_select_indices``) and column compaction (``keep_columns``) keep the headroom too.
Everything else is DynamicLayer's behaviour.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowableLayer(DynamicLayer):
    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    _klen: int = 0
    _vlen: int = 0  # tracked apart from _klen: parents assign keys, then read and assign values
    _rows: int = 0  # live rows; the buffers may hold more (rows evicted in place)

    # keys/values stay attributes for every caller (transformers and us): views of the live part.
    @property
    def keys(self):
        return None if self._k is None else self._k[: self._rows, :, : self._klen]

    @keys.setter
    def keys(self, t):
        self._k, self._klen, self._rows = t, 0 if t is None else t.shape[-2], 0 if t is None else t.shape[0]

    @property
    def values(self):
        return None if self._v is None else self._v[: self._rows, :, : self._vlen]

    @values.setter
    def values(self, t):
        self._v, self._vlen = t, 0 if t is None else t.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, used = key_states.shape[-2], self._klen
        if self._k is None or used + n > self._k.shape[-2] or key_states.shape[0] != self._rows:
            capacity = max(used + n, 2 * used, used + n + 64)
            # Both buffers are allocated before either is replaced: an out-of-memory error in the second
            # must not leave keys and values with different capacities.
            k = self._grow(self.keys, key_states, used, capacity)
            v = self._grow(self.values, value_states, used, capacity)
            self._k, self._v, self._rows = k, v, key_states.shape[0]
        self._k[: self._rows, :, used : used + n] = key_states
        self._v[: self._rows, :, used : used + n] = value_states
        self._klen = self._vlen = used + n
        return self.keys, self.values

    def reserve_rows(self, rows: int) -> None:
        """Make room for ``rows`` rows (doubling). Allocation only: the live cache is unchanged, so an
        out-of-memory error here leaves the layer consistent."""
        if rows <= self._k.shape[0]:
            return
        capacity = max(rows, 2 * self._rows)
        bufs = []
        for old in (self._k, self._v):
            buf = old.new_empty(capacity, *old.shape[1:])
            buf[: self._rows, :, : self._klen] = old[: self._rows, :, : self._klen]
            bufs.append(buf)
        self._k, self._v = bufs

    def append_rows(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add rows below the live ones, in place when the buffer has room. New rows may have fewer
        columns than the layer; their remaining columns are zeroed (the caller masks them), since
        masked garbage could still be NaN and 0 * NaN poisons attention."""
        n, cols = key_states.shape[0], key_states.shape[-2]
        assert cols <= self._klen, "new rows must not be longer than the cache"
        rows = self._rows + n
        self.reserve_rows(rows)
        for buf, new in ((self._k, key_states), (self._v, value_states)):
            buf[self._rows : rows, :, :cols] = new
            buf[self._rows : rows, :, cols : self._klen] = 0
        self._rows = rows

    def keep_columns(self, cols: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep only the columns ``cols`` (ascending), moved to the front of the buffers in place.

        ``scratch`` holds one [rows, heads, len(cols), head_dim] tensor for the keys and one for the
        values, allocated by the caller beforehand: selecting into them and copying back allocate
        nothing, so the layer cannot be left half compacted. The headroom is kept.
        """
        m = len(cols)
        for buf, used, out in ((self._k, self._klen, scratch[0]), (self._v, self._vlen, scratch[1])):
            torch.index_select(buf[: self._rows, :, :used], 2, cols, out=out)
            buf[: self._rows, :, :m] = out
        self._klen = self._vlen = m

    @staticmethod
    def _grow(old: torch.Tensor | None, like: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
        buf = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
        if old is not None and used:
            buf[..., :used, :] = old[..., :used, :]
        return buf

    def get_seq_length(self) -> int:
        return self._klen

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices``. When every row that moves comes from beyond the new row count (the
        decoder fills freed slots with the last rows), move just those rows in place."""
        if self._k is None:
            return
        idx = indices.tolist()
        n = len(idx)
        moves = [(dst, src) for dst, src in enumerate(idx) if dst != src]
        if all(src >= n for _, src in moves):
            for dst, src in moves:
                self._k[dst, :, : self._klen] = self._k[src, :, : self._klen]
                self._v[dst, :, : self._vlen] = self._v[src, :, : self._vlen]
        else:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
        self._rows = n


def growable_cache() -> Cache:
    return Cache(layer_class_to_replicate=GrowableLayer)


def keep_columns(cache: Cache, cols: torch.Tensor) -> None:
    """Keep only the columns ``cols`` (ascending) of every layer of a growable cache, in place.

    The only memory needed, a layer's worth of scratch per tensor shape, is allocated before anything
    moves, so an out-of-memory error here leaves the cache as it was. (Building every layer's new
    tensors first would be as safe but would need up to the whole cache again.)
    """
    def spec(t: torch.Tensor) -> tuple:
        return (*t.shape[:2], len(cols), *t.shape[3:]), t.dtype

    scratch: dict = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            shape, dtype = spec(t)
            if (shape, dtype) not in scratch:
                scratch[shape, dtype] = t.new_empty(shape)
    for layer in cache.layers:
        layer.keep_columns(cols, (scratch[spec(layer.keys)], scratch[spec(layer.values)]))
