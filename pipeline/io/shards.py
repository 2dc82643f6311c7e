"""Input side: resolve ``data.paths`` to Parquet shards, split them into chunks, read one chunk.

    from pipeline.io.shards import resolve_shards, plan_chunks, read_prompts
    shards = resolve_shards(cfg.data)          # validated before any model work
    for chunk in plan_chunks(shards, cfg.data.chunk_rows):
        ids, values, extra = read_values(chunk, cfg.data, ["positions"])  # the format's column (None: a null), + extra
        ids, prompts = read_prompts(chunk, cfg.data)  # the same, raising on the first bad row
    warn_duplicate_ids(shards, cfg.data)      # one warning when ids repeat: find_duplicate_ids
    check_no_nulls(shards, cfg.data)          # data.on_bad_row=error: a null prompt fails before model work
    prompts_by_id(shards, cfg.data, {"a17", "b3"})   # {"a17": "...", ...}: the report joins prompts back

A ``data.paths`` entry may be an fsspec URL (``hf://``, ``s3://``, ``gs://``, ``https://``, ``file://``;
see ``pipeline.io.remote``): it is read the same way, row group by row group. Each Shard carries its
file's identity (size, rows, and a hash of the Parquet footer or, for a URL, the server's ETag when it
gives one), which extract's fingerprint records. A chunk is a contiguous row range of one shard. Reading one only touches the row groups that cover
it, so memory stays bounded whatever the shard's size.
"""
from __future__ import annotations

import functools
import glob
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.io.remote import describe, expand_url, footer_sha256, is_url, open_parquet, reading, url_stem
from pipeline.io.rows import check_column, input_column, is_string_like, row_problem, row_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    index: int  # position in the resolved input list; fixes output order
    path: str
    num_rows: int
    has_id_column: bool
    size: int = 0            # bytes; with num_rows and footer_sha256 (or etag), the file's identity
    footer_sha256: str = ""  # of the Parquet footer (schema, row groups, their statistics)
    etag: str = ""           # a URL's ETag, when its server gives one (then the footer is not hashed)
    timeout_s: float = field(default=60.0, compare=False)  # data.remote_timeout_s, for reading a URL

    @property
    def identity(self) -> dict:
        """What extract's fingerprint records of this file, so a resume after the file was rewritten
        (even under the same name) is refused instead of mixing old chunks with new ones."""
        if self.etag:
            return {"size": self.size, "rows": self.num_rows, "etag": self.etag}
        return {"size": self.size, "rows": self.num_rows, "parquet_footer_sha256": self.footer_sha256}

    @property
    def version(self) -> str:
        """The content the plan saw: a URL whose version has moved by the time it is read is refused."""
        return self.etag or self.footer_sha256

    @property
    def name(self) -> str:
        """Output directory name: index keeps input order under a plain sort, stem keeps it readable."""
        stem = url_stem(self.path) if is_url(self.path) else Path(self.path).stem
        return f"{self.index:05d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}"


@dataclass(frozen=True)
class Chunk:
    shard: Shard
    index: int
    start: int  # first row (inclusive)
    stop: int   # last row (exclusive)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def sample_prompts_path() -> str:
    return str(resources.files("pipeline") / "data" / "sample_prompts.parquet")


def _expand(patterns: list[str], timeout_s: float) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        if is_url(pattern):
            files.extend(m for m in expand_url(pattern, timeout_s) if m not in files)
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise PipelineError(f"data.paths: {pattern!r} matched no files")
        files.extend(m for m in matches if m not in files)
    return files


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise PipelineError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from e


def _parquet(shard: Shard) -> pq.ParquetFile:
    """The shard's file, open: a URL's comes from remote's cache, checked against the planned version."""
    if is_url(shard.path):
        return open_parquet(shard.path, shard.version, shard.timeout_s)
    return _open(shard.path)


def _shard(i: int, path: str, data_cfg) -> Shard:
    """Open one file, check its columns and record its identity."""
    timeout_s = data_cfg.remote_timeout_s
    if is_url(path):
        pf, size, etag, footer = describe(path, timeout_s)
    else:
        pf, etag = _open(path), ""
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            footer = footer_sha256(f)
    schema = pf.schema_arrow
    check_column(path, schema, data_cfg)
    return Shard(i, path, pf.metadata.num_rows, data_cfg.id_column in schema.names, size, footer, etag, timeout_s)


def resolve_shards(data_cfg) -> list[Shard]:
    """Expand globs, open every file and check its columns, so bad input fails before model work."""
    files = _expand(data_cfg.paths, data_cfg.remote_timeout_s) if data_cfg.paths else [sample_prompts_path()]
    return [_shard(i, path, data_cfg) for i, path in enumerate(files)]


def plan_chunks(shards: list[Shard], chunk_rows: int) -> list[Chunk]:
    return [
        Chunk(s, j, start, min(start + chunk_rows, s.num_rows))
        for s in shards
        for j, start in enumerate(range(0, s.num_rows, chunk_rows))
    ]


def read_rows(shard: Shard, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a shard's file, reading only the row groups that cover them."""
    pf = _parquet(shard)
    groups, first_row, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first_row = offset if first_row is None else first_row
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    # A local file's modification time tells a rewrite; a URL's version was checked when it opened.
    version = shard.version if is_url(shard.path) else str(os.stat(shard.path).st_mtime_ns)
    return _row_groups(shard, version, tuple(groups), tuple(columns)).slice(start - first_row, stop - start)


@functools.lru_cache(maxsize=2)
def _row_groups(shard: Shard, version: str, groups: tuple[int, ...], columns: tuple[str, ...]) -> pa.Table:
    """Row groups are often far larger than a chunk (pyarrow's default is 1M rows); each process
    reads its chunks in order, so keeping the last groups read means each is decoded once, not once
    per chunk. Memory: at most two row groups of the prompt and id columns."""
    return _read_groups(shard, list(groups), [*columns])


def _read_groups(shard: Shard, groups: list[int], columns: list[str], pf: pq.ParquetFile | None = None) -> pa.Table:
    """Row groups of a shard (from ``pf``, its file already open, when given); a URL's failure (a
    timeout, a dropped connection) is one line naming it."""
    with reading(shard.path, shard.timeout_s):
        return (pf or _parquet(shard)).read_row_groups(groups, columns=columns)


def read_values(chunk: Chunk, data_cfg, extra: list[str] = ()) -> tuple[list[str], list, dict[str, list]]:
    """(ids, values, {column: values}) of one chunk: each row's value of the format's column, as
    Python objects (a string, a list of message dicts, or None; ``pipeline.io.rows`` says which ones
    are bad), and the values of the ``extra`` columns (extract.positions_column, say)."""
    shard = chunk.shard
    col = input_column(data_cfg)
    columns = [col] + ([data_cfg.id_column] if shard.has_id_column and data_cfg.id_column != col else [])
    columns += [c for c in extra if c not in columns]
    table = read_rows(shard, chunk.start, chunk.stop, columns)
    values = table.column(col).to_pylist()
    if shard.has_id_column:
        ids = [str(v) for v in table.column(data_cfg.id_column).to_pylist()]
    else:  # the shard's name, not the file stem: en/train.parquet and de/train.parquet must not collide
        ids = [f"{shard.name}:{chunk.start + i}" for i in range(len(values))]
    return ids, values, {c: table.column(c).to_pylist() for c in extra}


def read_schema(shard: Shard) -> pa.Schema:
    """The Arrow schema of an input file (its footer only)."""
    return _parquet(shard).schema_arrow


def read_prompts(chunk: Chunk, data_cfg) -> tuple[list[str], list]:
    """Like read_values, but the first bad row (a null prompt, say) is an error that names its row."""
    ids, values, _ = read_values(chunk, data_cfg)
    for i, v in enumerate(values):
        problem = row_problem(v, data_cfg)
        if problem is not None:
            raise bad_row_error(chunk.shard.path, chunk.start + i, problem, data_cfg)
    return ids, values


def bad_row_error(path: str, row: int, problem: str, data_cfg, column: str | None = None) -> PipelineError:
    return PipelineError(f"{path}: row {row}: {problem} (column {column or input_column(data_cfg)!r}); fix the row, "
                         "or set data.on_bad_row=skip to write such rows as error rows and go on")


def check_no_nulls(shards: list[Shard], data_cfg) -> None:
    """Refuse the first null of a string column before any model work, from the Parquet footer's
    null counts: no row is read unless a row group has one. (Other bad rows are found when their
    chunk is read, still before that chunk's model work.) A list column's leaf counts do not say
    whether a whole conversation is null, so only the prompt and text formats are checked here."""
    if data_cfg.format == "messages":
        return
    col = input_column(data_cfg)
    for shard in shards:
        pf = _parquet(shard)
        meta = pf.metadata
        leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == col)  # nested columns
        row = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(leaf).statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                nulls = _read_groups(shard, [g], [col], pf).column(0).is_null().to_numpy(zero_copy_only=False)
                first = row + int(np.argmax(nulls))
                raise bad_row_error(shard.path, first, f"{data_cfg.format} is None, not a string", data_cfg)
            row += group.num_rows


def prompts_by_id(shards: list[Shard], data_cfg, wanted: set[str]) -> dict[str, str]:
    """The prompts (a conversation as 'role: content' lines) of the rows whose ids are in ``wanted`` (ids as ``read_prompts`` makes them), read a
    row group at a time: only the id column is read whole, and memory holds one row group's ids."""
    from pandas import Series

    found: dict[str, str] = {}
    for shard in shards:
        if not shard.has_id_column:  # generated ids name their row: '<shard name>:<row>'
            for name, _, row in sorted(i.rpartition(":") for i in wanted):
                if name == shard.name and row.isdigit() and int(row) < shard.num_rows:
                    table = read_rows(shard, int(row), int(row) + 1, [input_column(data_cfg)])
                    found[f"{name}:{row}"] = row_text(table.column(0)[0].as_py(), data_cfg)
            continue
        pf, targets = _parquet(shard), list(wanted)
        for g in range(pf.metadata.num_row_groups):
            ids = _id_strings(_read_groups(shard, [g], [data_cfg.id_column], pf).column(0))
            hits = np.flatnonzero(Series(ids).isin(targets).to_numpy())  # hashed, not a Python loop per row
            if hits.size:
                prompts = _read_groups(shard, [g], [input_column(data_cfg)], pf).column(0).take(hits)
                found.update((ids[i], row_text(p, data_cfg)) for i, p in zip(hits, prompts.to_pylist())
                             if ids[i] not in found)
    return found


def find_duplicate_ids(shards: list[Shard], data_cfg) -> tuple[int, str | None]:
    """(rows whose id an earlier row already has, one such id) over every shard with an id column.

    Generated ids (``<shard name>:<row>``) are unique by construction and are not read. Ids are
    compared as the strings ``read_prompts`` writes.
    """
    from pandas.util import hash_array

    # One uint64 hash per row, read a row group at a time: 8 bytes a row (a set of Python strings
    # costs ~10x that), sorted once at the end. Two distinct ids share a hash with probability
    # about rows^2 / 2^65 (3e-4 for 10^8 rows), and the result only feeds a warning.
    hashes: list[np.ndarray] = []
    where: list[tuple[Shard, int, int]] = []  # (shard, first row, rows) of each hashes[] entry
    for shard in (s for s in shards if s.has_id_column):
        pf, row = _parquet(shard), 0
        for g in range(pf.metadata.num_row_groups):
            ids = _id_strings(_read_groups(shard, [g], [data_cfg.id_column], pf).column(0))
            hashes.append(hash_array(ids, categorize=False))
            where.append((shard, row, len(ids)))
            row += len(ids)
    if not hashes:
        return 0, None
    flat = np.concatenate(hashes)
    ordered = np.sort(flat)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return 0, None
    first = int(np.argmax(np.isin(flat, repeated)))  # the first row whose id occurs again later
    offsets = np.cumsum([n for _, _, n in where])
    k = int(np.searchsorted(offsets, first, side="right"))  # the row group that holds it
    shard, row = where[k][0], where[k][1] + first - int(offsets[k] - where[k][2])
    example = _id_strings(read_rows(shard, row, row + 1, [data_cfg.id_column]).column(0))[0]
    return len(repeated), example


def _id_strings(column: pa.ChunkedArray) -> np.ndarray:
    """The ids as read_prompts writes them (``str(value)``, so a null is 'None'), as an object array."""
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.cast(t.value_type), t.value_type
    if is_string_like(t) or pa.types.is_integer(t):  # Arrow's cast gives str()'s text for these
        column = pc.fill_null(column.cast(pa.large_string()), "None")
        return column.to_numpy(zero_copy_only=False)
    return np.array([str(v) for v in column.to_pylist()], dtype=object)


def warn_duplicate_ids(shards: list[Shard], data_cfg) -> None:
    """One warning, with a count, when ids repeat within a run (they are kept: no row is dropped)."""
    n, example = find_duplicate_ids(shards, data_cfg)
    if n:
        log.warning("data: %d row(s) share an id with an earlier row (e.g. %r); ids are kept as they are, so "
                    "outputs cannot be joined back by id alone: set data.id_column to a column whose values "
                    "are unique", n, example)
