"""Every row of a run, streamed once per stage into bounded statistics and a fixed-size sample.

    from pipeline.report.collect import collect_rows
    rows = collect_rows(cfg, stage_dirs={"extract": "...", "verbalize": "...", "score": "..."})
    rows.norms.mean, rows.generated.total(group=1), rows.fve.quantile(0.5)
    rows.sample.rows          # [{"id", "explanation", "finished", "n_generated", "fve", "prompt", ...}]
    rows.extremes.best        # [(fve, row), ...] best first

One pass per stage, a record batch at a time: the activation files (norms, prompt token counts),
the explanation files (generated lengths, finished), the score files (cosine, FVE, FVE by length,
best and worst). The table's sample is drawn in the first stage that has files (verbalize, else
extract, else score); the later passes fill in its other columns by id. Prompts are then read back
from the input files the run recorded in extract's fingerprint, by id, for the sampled rows only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.io.layout import FINGERPRINT, StageDir
from pipeline.report.stats import Counts, Extremes, Histogram, Sample

log = logging.getLogger(__name__)

BATCH_ROWS = 65536  # Parquet rows per record batch; activation files are read one batch as written
PROMPT_CHARS = 240  # prompts are shortened to this in the page
TEXT_CHARS = 2000   # and explanations (normally far shorter) to this


@dataclass
class RunRows:
    sample: Sample
    extremes: Extremes
    primary: str | None = None  # the stage the sample was drawn from
    rows: dict = field(default_factory=dict)        # stage -> rows read
    error_rows: dict = field(default_factory=dict)  # stage -> rows with an error
    norms: Histogram = field(default_factory=Histogram)
    prompt_tokens: Counts = field(default_factory=Counts)
    generated: Counts = field(default_factory=Counts)  # group 1: finished before the cap, 0: cut at it
    cosine: Histogram = field(default_factory=Histogram)
    fve: Histogram = field(default_factory=Histogram)
    fve_by_length: Histogram = field(default_factory=Histogram)  # groups: n_generated
    has_position: bool = False
    prompts_note: str | None = None  # why prompts are missing, if they are


def _where(path: Path) -> tuple[str, int]:
    return path.parent.name, int(path.stem.split("_")[1])


def _column(batch, name: str):
    return batch.column(name).to_numpy(zero_copy_only=False) if name in batch.schema.names else None


def _strings(batch, name: str):
    """A string column left in Arrow (``col[i].as_py()`` for the few rows shown), or None if absent."""
    return batch.column(name) if name in batch.schema.names else None


def _set(column, rows: int) -> np.ndarray:
    """Which rows of a nullable column hold a value (an error message, say), vectorized."""
    return np.zeros(rows, bool) if column is None else column.is_valid().to_numpy(zero_copy_only=False)


def _scalar(value):
    return value.item() if isinstance(value, np.generic) else value


def _arrow_batches(path: Path):
    with pa.memory_map(str(path)) as src:
        yield from pa.ipc.open_stream(src)


def _parquet_batches(path: Path, columns: list[str]):
    pf = pq.ParquetFile(path)
    yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=[c for c in columns if c in pf.schema_arrow.names])


def _norms(batch) -> tuple[np.ndarray, np.ndarray]:
    """(L2 norm of each row's activation, which rows have one) of one activation record batch."""
    col = batch.column("activation")
    size = col.type.list_size
    values = col.values[col.offset * size : (col.offset + len(col)) * size]
    v = values.to_numpy(zero_copy_only=False).reshape(-1, size).astype(np.float32, copy=False)  # [rows, d_model]
    ok = ~col.is_null().to_numpy(zero_copy_only=False)
    return np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64)), ok


def _new_rows(ids, fill, start: tuple[str, int, int]):
    """Rows for the batch indices a sampler keeps, each filled and ordered by (shard, chunk, row)."""
    shard, chunk, offset = start
    return lambda idx: [fill({"id": ids[i], "order": (shard, chunk, offset + i)}, i) for i in idx]


def _sample(acc: RunRows, primary: bool, ids, fill, new_rows) -> None:
    """The primary stage draws the table's sample; every other stage fills in the rows already drawn."""
    if primary:
        acc.sample.add(ids, new_rows)
    else:
        for i, row in acc.sample.matches(ids):
            fill(row, i)


def _scan_activations(files: list[Path], acc: RunRows, primary: bool) -> None:
    for path in tqdm(files, desc="report: activations", unit="file", leave=False):
        shard, chunk = _where(path)
        offset = 0
        for batch in _arrow_batches(path):
            ids, errors = _column(batch, "id"), _strings(batch, "error")
            bad = _set(errors, len(ids))
            norms, ok = _norms(batch) if pa.types.is_fixed_size_list(batch.schema.field("activation").type) else (
                np.full(len(ids), np.nan), np.zeros(len(ids), bool))
            acc.norms.add(norms[ok & ~bad])
            n_tokens, position = _column(batch, "n_tokens"), _column(batch, "position")
            acc.has_position |= position is not None
            if n_tokens is not None:
                acc.prompt_tokens.add(n_tokens)
            acc.rows["extract"] = acc.rows.get("extract", 0) + len(ids)
            acc.error_rows["extract"] = acc.error_rows.get("extract", 0) + int(bad.sum())

            def fill(row, i):
                row.update(n_tokens=None if n_tokens is None else int(n_tokens[i]),
                           position=None if position is None else _scalar(position[i]), norm=float(norms[i]) if ok[i] else None)
                if bad[i]:
                    row["error"] = row.get("error") or f"extract: {errors[i].as_py()}"
                return row

            _sample(acc, primary, ids, fill, _new_rows(ids, fill, (shard, chunk, offset)))
            offset += len(ids)


EXPLANATION_COLUMNS = ["id", "explanation", "finished", "n_generated", "error"]


def _scan_explanations(files: list[Path], acc: RunRows, primary: bool) -> None:
    for path in tqdm(files, desc="report: explanations", unit="file", leave=False):
        shard, chunk = _where(path)
        offset = 0
        for batch in _parquet_batches(path, EXPLANATION_COLUMNS):
            ids, finished, n_gen = _column(batch, "id"), _column(batch, "finished"), _column(batch, "n_generated")
            text, errors = _strings(batch, "explanation"), _strings(batch, "error")  # read only for sampled rows
            bad = _set(errors, len(ids))
            acc.generated.add(n_gen[~bad], groups=finished[~bad].astype(np.int64))
            acc.rows["verbalize"] = acc.rows.get("verbalize", 0) + len(ids)
            acc.error_rows["verbalize"] = acc.error_rows.get("verbalize", 0) + int(bad.sum())

            def fill(row, i):
                row.update(explanation=(text[i].as_py() or "")[:TEXT_CHARS], finished=bool(finished[i]),
                           n_generated=int(n_gen[i]))
                if bad[i] and not row.get("error"):
                    row["error"] = errors[i].as_py()
                return row

            _sample(acc, primary, ids, fill, _new_rows(ids, fill, (shard, chunk, offset)))
            offset += len(ids)


SCORE_COLUMNS = ["id", "cosine", "fve", "finished", "n_generated", "error"]


def _scan_scores(files: list[Path], acc: RunRows, primary: bool) -> None:
    for path in tqdm(files, desc="report: scores", unit="file", leave=False):
        shard, chunk = _where(path)
        offset = 0
        for batch in _parquet_batches(path, SCORE_COLUMNS):
            ids, n_gen, finished = _column(batch, "id"), _column(batch, "n_generated"), _column(batch, "finished")
            cosine = _column(batch, "cosine").astype(np.float64)  # nulls (unscored rows) become NaN
            fve = _column(batch, "fve").astype(np.float64)
            scored = ~np.isnan(fve)
            acc.cosine.add(cosine[scored])
            acc.fve.add(fve[scored])
            acc.fve_by_length.add(fve[scored], groups=n_gen[scored])
            acc.rows["score"] = acc.rows.get("score", 0) + len(ids)
            acc.error_rows["score"] = acc.error_rows.get("score", 0) + int((~scored).sum())

            def fill(row, i):
                row.update(fve=None if np.isnan(fve[i]) else float(fve[i]),
                           cosine=None if np.isnan(cosine[i]) else float(cosine[i]))
                row.setdefault("n_generated", int(n_gen[i]))
                row.setdefault("finished", bool(finished[i]))
                return row

            new_rows = _new_rows(ids, fill, (shard, chunk, offset))
            acc.extremes.add(fve, new_rows)
            _sample(acc, primary, ids, fill, new_rows)
            offset += len(ids)


def _explanations_of(rows: list[dict], verbalize_dir: str) -> None:
    """Explanation text of the best and worst rows, read from their own chunk files only."""
    out = StageDir(verbalize_dir, ".parquet")
    for shard, chunk in sorted({r["order"][:2] for r in rows}):
        path = out.chunk_path(shard, chunk)
        if not path.exists():
            continue
        t = pq.read_table(path, columns=["id", "explanation"])
        texts = dict(zip(t.column("id").to_pylist(), t.column("explanation").to_pylist()))
        for r in rows:
            if r["order"][:2] == (shard, chunk) and r["id"] in texts:
                r["explanation"] = (texts[r["id"]] or "")[:TEXT_CHARS]


def _join_prompts(cfg, extract_dir: str, rows: list[dict]) -> str | None:
    """Each row's prompt (shortened), from the input files extract read, by id; why not, if not."""
    from pipeline.io.shards import prompts_by_id, resolve_shards

    fp = Path(extract_dir) / FINGERPRINT
    settings = json.loads(fp.read_text(encoding="utf-8")).get("settings", {}) if fp.exists() else {}
    data = dataclasses.replace(cfg.data, **{k.split(".", 1)[1]: settings[k] for k in
                                            ("data.paths", "data.format", "data.prompt_column", "data.messages_column",
                                             "data.text_column", "data.id_column") if k in settings})
    try:
        shards = resolve_shards(data)
    except PipelineError as e:
        return f"prompts not shown: {e}"
    found = prompts_by_id(shards, data, {r["id"] for r in rows})
    for r in rows:
        p = found.get(r["id"])
        r["prompt"] = None if p is None else (p if len(p) <= PROMPT_CHARS else p[: PROMPT_CHARS - 1] + "…")
        r["prompt_chars"] = None if p is None else len(p)
    lost = sum(r["id"] not in found for r in rows)
    return f"{lost} row(s) have no prompt: their id is not in the input files" if lost else None


def collect_rows(cfg, stage_dirs: dict[str, str]) -> RunRows:
    """Stream every stage's files once; draw the table's sample; join prompts for the shown rows."""
    acc = RunRows(Sample(cfg.report.sample_rows, cfg.report.seed), Extremes(cfg.report.best_worst))
    suffix = {"extract": ".arrow", "verbalize": ".parquet", "score": ".parquet"}
    files = {name: StageDir(root, suffix[name]).chunk_files() for name, root in stage_dirs.items()}
    acc.primary = next((n for n in ("verbalize", "extract", "score") if files.get(n)), None)
    scans = {"extract": _scan_activations, "verbalize": _scan_explanations, "score": _scan_scores}
    for name in sorted(files, key=lambda n: n != acc.primary):  # the sample's stage first
        if files[name]:
            log.info("report: reading %d %s file(s) in %s", len(files[name]), name, stage_dirs[name])
            scans[name](files[name], acc, primary=name == acc.primary)
    acc.sample.rows.sort(key=lambda r: r["order"])
    extremes = [r for _, r in acc.extremes.best + acc.extremes.worst]
    if extremes and "verbalize" in stage_dirs:
        _explanations_of(extremes, stage_dirs["verbalize"])
    shown = acc.sample.rows + extremes
    if shown:
        acc.prompts_note = _join_prompts(cfg, stage_dirs.get("extract", cfg.extract.output_dir), shown)
    return acc
