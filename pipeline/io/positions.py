"""Which positions of a rendered row extract reads (``extract.positions``).

    from pipeline.io.positions import select_positions, positions_rule, check_positions_column
    positions, problem = select_positions(cfg.extract, n_tokens=812, row_id="doc-17")   # sorted, or [] and why
    positions, problem = select_positions(cfg.extract, 812, "doc-17", explicit=[0, -1])  # mode column
    positions_rule(cfg.extract)    # the rule in words: extract's fingerprint and its files' metadata

Modes:
- ``last``: the last token (the model card's reading).
- ``all``: every position.
- ``random``: ``positions_per_row`` positions at index >= ``min_position`` (the NLA release drew 10 at
  index >= 50 from each document), without replacement. Each row's draw comes from its own RNG,
  seeded by a hash of ``extract.seed`` and the row's id, so a resume, or a run with another number
  of processes, draws the same positions: the draw depends on nothing but the row.
- ``column``: the row's own list in ``positions_column``; a negative position counts from the end.

A position indexes the token sequence the model reads (after ``data.truncation``). Positions come
back sorted and without repeats. A row with fewer eligible positions than asked for gives all of
them (for ``column``: the ones inside the row); a row with none gets a problem, and extract writes it
as an error row.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError

MODES = ("last", "all", "random", "column")


def positions_rule(extract_cfg) -> str:
    """The rule in words (what the fingerprint and the file metadata record)."""
    mode = extract_cfg.positions
    if mode == "random":
        return (f"random: {extract_cfg.positions_per_row} per row at index >= {extract_cfg.min_position}, "
                f"seed {extract_cfg.seed} + row id")
    if mode == "column":
        return f"column: {extract_cfg.positions_column}"
    return mode


def row_seed(seed: int, row_id: str) -> int:
    """A 64-bit seed from ``extract.seed`` and the row id (sha256: stable across runs and Pythons,
    unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{row_id}".encode()).digest()[:8], "little")


def select_positions(extract_cfg, n_tokens: int, row_id: str, explicit=None) -> tuple[list[int], str | None]:
    """(sorted positions, None), or ([], why) when the row has no eligible position."""
    mode = extract_cfg.positions
    if n_tokens < 1:
        return [], "the row has no tokens"
    if mode == "last":
        return [n_tokens - 1], None
    if mode == "all":
        return list(range(n_tokens)), None
    if mode == "random":
        first = extract_cfg.min_position
        eligible = n_tokens - first
        if eligible < 1:
            return [], (f"no position at index >= extract.min_position={first} "
                        f"(the row has {n_tokens} tokens)")
        k = min(extract_cfg.positions_per_row, eligible)
        rng = np.random.default_rng(row_seed(extract_cfg.seed, row_id))
        return sorted(int(first + i) for i in rng.choice(eligible, size=k, replace=False)), None
    # column
    if explicit is None:
        return [], f"{extract_cfg.positions_column} is null"
    inside = sorted({p + n_tokens if p < 0 else p for p in explicit if -n_tokens <= p < n_tokens})
    if not inside:
        return [], (f"none of the positions {list(explicit)[:8]} is inside the row's {n_tokens} tokens "
                    f"(column {extract_cfg.positions_column!r})")
    return inside, None


def check_positions_column(path: str, schema: pa.Schema, column: str) -> None:
    """The positions column exists and holds lists of integers; one line naming the file otherwise."""
    if column not in schema.names:
        raise PipelineError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                            "set extract.positions_column (extract.positions=column)")
    t = schema.field(column).type
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not (listy and pa.types.is_integer(t.value_type)):
        raise PipelineError(f"{path}: column {column!r} holds {t}, not lists of integers (extract.positions=column)")


def explicit_problem(value, column: str) -> str | None:
    """Why one row's positions list cannot be used (a null list or a null inside it), or None."""
    if value is None:
        return f"{column} is null"
    if any(p is None for p in value):
        return f"{column} holds a null position"
    return None
