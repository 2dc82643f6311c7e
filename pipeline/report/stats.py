"""Streaming accumulators with bounded memory, fed one record batch at a time.

    from pipeline.report.stats import Histogram, Counts, Sample, Extremes
    h = Histogram(); h.add(norms)                      # floats, range unknown in advance
    by_len = Histogram(); by_len.add(fve, groups=n_generated)   # one row of bins per group, one y range
    c = Counts(); c.add(n_tokens); c.add(n_generated, groups=finished)   # exact counts of small ints
    s = Sample(k=2000, seed=0); s.add(ids, lambda idx: [row(i) for i in idx])   # k rows, uniform, by id
    e = Extremes(n=20); e.add(fve, lambda idx: [row(i) for i in idx])            # best and worst n

Memory is fixed by the parameters (bins, k, n, the largest integer seen), never by the rows read, so
a report over ten million rows holds what one over ten rows holds.
"""
from __future__ import annotations

import math

import numpy as np


class Histogram:
    """Counts of floats in ``BINS`` equal bins over a range that doubles (merging pairs of bins) until
    it covers every value seen: one pass, no range needed in advance, and the bins stay at least
    1/BINS of the data's span wide. ``groups`` (small non-negative ints) keep one row of bins each,
    all on the same range (FVE per explanation length)."""

    BINS = 1024

    def __init__(self):
        self.counts: np.ndarray | None = None  # [groups, BINS] int64
        self.lo = self.width = 0.0
        self.n, self.total = 0, 0.0
        self.min, self.max = math.inf, -math.inf
        self.group_n = np.zeros(0, np.int64)
        self.group_total = np.zeros(0, np.float64)

    def add(self, values, groups=None) -> None:
        x = np.asarray(values, dtype=np.float64)
        g = np.zeros(len(x), np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        keep = np.isfinite(x) & (g >= 0)
        x, g = x[keep], g[keep]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.n += x.size
        self.total += float(x.sum())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.counts is None:
            span = hi - lo if hi > lo else max(abs(lo), 1.0) * 1e-3  # all equal so far: a small range
            self.lo, self.width = lo - span / 2, 2 * span / self.BINS
            self.counts = np.zeros((1, self.BINS), np.int64)
        while lo < self.lo:
            self._double(keep_low=False)
        while hi >= self.lo + self.BINS * self.width:
            self._double(keep_low=True)
        groups_needed = int(g.max()) + 1
        if groups_needed > len(self.counts):
            self.counts = np.pad(self.counts, ((0, groups_needed - len(self.counts)), (0, 0)))
            self.group_n = np.pad(self.group_n, (0, groups_needed - len(self.group_n)))
            self.group_total = np.pad(self.group_total, (0, groups_needed - len(self.group_total)))
        idx = np.clip(((x - self.lo) / self.width).astype(np.int64), 0, self.BINS - 1)
        flat = np.bincount(g * self.BINS + idx, minlength=self.counts.size)
        self.counts += flat.reshape(self.counts.shape)
        self.group_n += np.bincount(g, minlength=len(self.group_n))
        self.group_total += np.bincount(g, weights=x, minlength=len(self.group_total))

    def _double(self, keep_low: bool) -> None:
        """Twice the bin width: pairs of bins merge, and the range grows up (or down) by its old size."""
        merged = self.counts.reshape(len(self.counts), -1, 2).sum(axis=2)
        empty = np.zeros_like(merged)
        if keep_low:
            self.counts = np.concatenate([merged, empty], axis=1)
        else:
            self.counts = np.concatenate([empty, merged], axis=1)
            self.lo -= self.BINS * self.width
        self.width *= 2

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def grid(self, max_bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """(edges [k+1], counts [groups, k]) for a plot: the empty ends trimmed, neighbouring bins
        merged to at most ``max_bins``."""
        nonzero = np.flatnonzero(self.counts.sum(axis=0))
        first, last = int(nonzero[0]), int(nonzero[-1]) + 1
        factor = max(1, math.ceil((last - first) / max_bins))
        last = first + factor * math.ceil((last - first) / factor)
        counts = np.pad(self.counts, ((0, 0), (0, max(0, last - self.BINS))))[:, first:last]
        counts = counts.reshape(len(counts), -1, factor).sum(axis=2)
        edges = self.lo + self.width * (first + factor * np.arange(counts.shape[1] + 1))
        return edges, counts

    def bins(self, max_bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """(edges [k+1], counts [k]) over every group."""
        edges, counts = self.grid(max_bins)
        return edges, counts.sum(axis=0)

    def quantile(self, q: float) -> float | None:
        """Approximate quantile (to within one bin), interpolated inside its bin."""
        if not self.n:
            return None
        counts = self.counts.sum(axis=0)
        cum = np.cumsum(counts)
        target = q * self.n
        i = int(np.searchsorted(cum, target))
        before = cum[i - 1] if i else 0
        inside = (target - before) / counts[i] if counts[i] else 0.0
        return float(min(max(self.lo + self.width * (i + inside), self.min), self.max))


class Counts:
    """Exact counts of non-negative integers (token lengths), optionally split by small int groups."""

    def __init__(self):
        self.counts: dict[int, np.ndarray] = {}

    def add(self, values, groups=None) -> None:
        v = np.asarray(values, dtype=np.int64)
        g = np.zeros(len(v), np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        v, g = v[v >= 0], g[v >= 0]
        for group in np.unique(g):
            c = np.bincount(v[g == group])
            old = self.counts.get(int(group), np.zeros(0, np.int64))
            size = max(len(old), len(c))
            self.counts[int(group)] = np.pad(old, (0, size - len(old))) + np.pad(c, (0, size - len(c)))

    def total(self, group: int | None = None) -> int:
        arrays = self.counts.values() if group is None else [self.counts.get(group, np.zeros(0, np.int64))]
        return int(sum(a.sum() for a in arrays))

    def table(self, group: int | None = None) -> np.ndarray:
        """Counts of 0..max over every group (or one), as one array."""
        size = max((len(a) for a in self.counts.values()), default=0)
        arrays = self.counts.values() if group is None else [self.counts.get(group, np.zeros(0, np.int64))]
        return sum((np.pad(a, (0, size - len(a))) for a in arrays), np.zeros(size, np.int64))

    def mean(self) -> float | None:
        t = self.table()
        return float((t * np.arange(len(t))).sum() / t.sum()) if t.sum() else None

    def quantile(self, q: float) -> int | None:
        t = self.table()
        return int(np.searchsorted(np.cumsum(t), q * t.sum())) if t.sum() else None

    def max(self) -> int | None:
        t = self.table()
        return int(np.flatnonzero(t)[-1]) if t.sum() else None


def id_keys(ids, seed: int) -> np.ndarray:
    """A 64-bit hash of each id (str), seeded: the sampling key. pandas' SipHash, vectorized."""
    from pandas.util import hash_array

    return hash_array(np.asarray(ids, dtype=object), hash_key=f"nla-report{seed:06d}"[:16], categorize=False)


class Sample:
    """k rows drawn uniformly without replacement: every id gets a seeded hash key and the k smallest
    keys are kept (bottom-k sampling). The draw does not depend on the order in which files are read,
    nor on how many ranks wrote them; the same ids and seed give the same sample. ``rows_of(indices)``
    is asked only for the batch's rows that enter the sample (about k·ln(N/k) rows over a run)."""

    def __init__(self, k: int, seed: int):
        self.k, self.seed = k, seed
        self.keys = np.zeros(0, np.uint64)
        self.rows: list[dict] = []
        self.seen = 0
        self._by_id: dict[str, dict] | None = None

    def add(self, ids, rows_of) -> None:
        ids = np.asarray(ids, dtype=object)
        self.seen += len(ids)
        keys = id_keys(ids, self.seed)
        chosen = np.flatnonzero(keys < self.keys.max()) if len(self.keys) >= self.k else np.arange(len(ids))
        if not chosen.size:
            return
        keys, rows = np.concatenate([self.keys, keys[chosen]]), self.rows + list(rows_of(chosen))
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            keys, rows = keys[keep], [rows[i] for i in keep]
        self.keys, self.rows, self._by_id = keys, rows, None

    def matches(self, ids) -> list[tuple[int, dict]]:
        """(index in ``ids``, sampled row) for each of ``ids`` in the sample: a later pass fills in the
        row's other columns (the FVE, the position) from another stage's files."""
        if not len(self.rows):
            return []
        if self._by_id is None:
            self._by_id = {r["id"]: r for r in self.rows}
        ids = np.asarray(ids, dtype=object)
        hits = np.flatnonzero(np.isin(id_keys(ids, self.seed), self.keys))
        return [(int(i), self._by_id[ids[i]]) for i in hits if ids[i] in self._by_id]


class Extremes:
    """The n rows with the highest and the n with the lowest value (NaN rows never count)."""

    def __init__(self, n: int):
        self.n = n
        self.best: list[tuple[float, dict]] = []
        self.worst: list[tuple[float, dict]] = []

    def add(self, values, rows_of) -> None:
        if not self.n:
            return
        v = np.asarray(values, dtype=np.float64)
        for side, sign in ((self.best, 1.0), (self.worst, -1.0)):
            s = sign * v
            ok = np.flatnonzero(~np.isnan(s))
            if len(side) >= self.n:  # only rows that beat the current n-th can enter
                ok = ok[s[ok] > sign * side[-1][0]]
            if len(ok) > self.n:
                ok = ok[np.argpartition(-s[ok], self.n - 1)[: self.n]]
            if not len(ok):
                continue
            merged = side + [(float(v[i]), row) for i, row in zip(ok, rows_of(ok))]
            merged.sort(key=lambda item: -sign * item[0])
            side[:] = merged[: self.n]
