"""The stage driver: list work, refuse a mismatched resume, skip what is done, split the rest by rank.

    from pipeline.driver import run_stage
    result = run_stage(ExtractStage(cfg, rt), cfg, rt, overwrite=False)
    result.rows, result.seconds, result.out_dir

A stage object supplies ``out`` (a StageDir), ``plan()`` (every Unit, in input order),
``settings()`` (what changes its outputs), ``shard_ready(name)`` (may the shard be marked complete once
all its chunks exist), ``setup()`` (load models; called only if there is work)
and ``process(unit, progress, prepared)`` (write one chunk atomically, return its stats;
``progress(n)``, when given, is called as rows finish). A stage may also offer ``prepare(unit)``
(read and tokenize), which the driver runs one unit ahead in a background thread, and
``process_stream(units_and_prepared, progress)``, a generator of (unit, stats) that may work on
several units at once (verbalize keeps its decoder full across chunk boundaries). The driver owns
the rest.

Work split: rank r takes ``pending[r::world_size]``, where ``pending`` is the units without a final
file. Every rank computes the same list from the same directory listing at start-up (after a
barrier), so no chunk is done twice or skipped, and a resume may use any number of processes.
There is no collective at the end: a rank with less work simply exits.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pipeline.config import fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    shard: str      # shard directory name, e.g. "00000-train"
    index: int      # chunk index within the shard
    num_rows: int
    source: object  # what process() reads: a shards.Chunk or an input file path


@dataclass
class StageResult:
    stage: str
    out_dir: str
    rows: int = 0
    chunks: int = 0
    seconds: float = 0.0
    skipped_chunks: int = 0
    rows_in_output: int = 0  # finished rows on disk when this rank ended (all ranks' work)
    rows_planned: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _mark_complete_shards(stage, units: list[Unit], shards: set[str] | None = None) -> None:
    by_shard: dict[str, list[Unit]] = {}
    for u in units:
        by_shard.setdefault(u.shard, []).append(u)
    for name, shard_units in by_shard.items():
        if shards is not None and name not in shards:
            continue
        if stage.shard_ready(name) and all(stage.out.chunk_done(name, u.index) for u in shard_units):
            stage.out.mark_complete(name, {"chunks": len(shard_units), "rows": sum(u.num_rows for u in shard_units)})


def prepare_output(stage, cfg, rt, overwrite: bool) -> None:
    """Rank 0 wipes (on --overwrite), checks the fingerprint and writes it. Callers then barrier."""
    if not rt.is_main:
        return
    settings = stage.settings()
    fp = fingerprint(settings)
    if overwrite:
        stage.out.wipe()
    stage.out.check_fingerprint(fp, settings)
    stage.out.write_fingerprint(fp, settings, cfg.to_dict())
    removed = stage.out.clean_stale_tmp()
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", stage.name, removed)


def process_units(stage, cfg, rt, units: list[Unit], pending: list[Unit], mine: list[Unit]) -> StageResult:
    """Process this rank's units, marking shards complete as they fill up. No collective at the end."""
    rt.setup_logging(cfg.log_level, stage.out.log_path(rt.rank))
    result = StageResult(stage.name, str(stage.out.root), skipped_chunks=len(units) - len(pending))
    log.info("%s: %d chunk(s) in all, %d already done, %d pending; rank %d of %d takes %d",
             stage.name, len(units), result.skipped_chunks, len(pending), rt.rank, rt.world_size, len(mine))
    if mine:
        stage.setup()
    start = time.perf_counter()
    bar = tqdm(total=sum(u.num_rows for u in pending), desc=stage.name, unit="row", dynamic_ncols=True,
               disable=not rt.is_main)
    with bar, stage.out.background_writes():
        # A lone process can also tick the bar inside a chunk (verbalize chunks take minutes).
        tick = (lambda n: bar.update(n)) if rt.world_size == 1 else None
        for unit, stats in _processed(stage, mine, tick):
            result.rows += unit.num_rows
            result.chunks += 1
            for k, v in stats.items():
                result.stats[k] = result.stats.get(k, 0) + v
            _mark_complete_shards(stage, units, {unit.shard})  # a chunk still in the writer: next time, or below
            # Rank 0's bar shows every rank's progress: count the finished files of pending units.
            done = max(bar.n, result.rows) if rt.world_size == 1 else sum(
                u.num_rows for u in pending if stage.out.chunk_done(u.shard, u.index))
            bar.update(done - bar.n)
            if "tokens" in result.stats:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{result.stats['tokens'] / elapsed:,.0f}", refresh=False)
    result.seconds = time.perf_counter() - start
    _mark_complete_shards(stage, units)
    result.rows_planned = sum(u.num_rows for u in units)
    result.rows_in_output = sum(u.num_rows for u in units if stage.out.chunk_done(u.shard, u.index))
    if mine:
        log.info("%s: rank %d wrote %d row(s) in %d chunk(s) in %.1fs (%.1f rows/s)", stage.name, rt.rank,
                 result.rows, result.chunks, result.seconds, result.rows_per_s)
    return result


def _processed(stage, units: list[Unit], progress):
    """Yield (unit, stats) as units are written: through ``stage.process_stream`` when the stage
    keeps work going across units (verbalize's decoder), else one ``process`` call per unit."""
    if not units:  # setup() was not called
        return
    prepared = _prefetched(stage, units)
    if hasattr(stage, "process_stream"):
        yield from stage.process_stream(prepared, progress)
    else:
        for unit, inputs in prepared:
            yield unit, stage.process(unit, progress=progress, prepared=inputs)


def _prefetched(stage, units: list[Unit]):
    """Yield (unit, prepared input). A stage with ``prepare(unit)`` (reading, tokenizing) gets the next
    unit's input prepared in a background thread while the current one computes on the device."""
    prepare = getattr(stage, "prepare", None)
    if prepare is None:
        yield from ((u, None) for u in units)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        ahead = pool.submit(prepare, units[0]) if units else None
        for i, unit in enumerate(units):
            prepared = ahead.result()  # re-raises the reader's error (a bad row) here, in order
            ahead = pool.submit(prepare, units[i + 1]) if i + 1 < len(units) else None
            yield unit, prepared


def _pending(stage, units: list[Unit]) -> list[Unit]:
    return [u for u in units if not stage.out.chunk_done(u.shard, u.index)]


def run_stage(stage, cfg, rt, overwrite: bool = False) -> StageResult:
    """One stage on its own: every rank takes ``pending[rank::world_size]``."""
    units = stage.plan()
    rt.setup_logging(cfg.log_level, stage.out.log_path(rt.rank))
    prepare_output(stage, cfg, rt, overwrite)
    rt.barrier()  # the only collective: rank 0's wipe/fingerprint happen before anyone lists work
    pending = _pending(stage, units)
    return process_units(stage, cfg, rt, units, pending, pending[rt.rank :: rt.world_size])


def run_pipeline(extract_stage, verbalize_stage, cfg, rt, overwrite: bool = False) -> list[StageResult]:
    """Both stages with one split of the work: a rank verbalizes exactly the chunks it extracts
    (or finds extracted), so no rank ever waits for another between the stages."""
    units = extract_stage.plan()
    rt.setup_logging(cfg.log_level, extract_stage.out.log_path(rt.rank))
    prepare_output(extract_stage, cfg, rt, overwrite)
    prepare_output(verbalize_stage, cfg, rt, overwrite)  # after extract's: it records extract's fingerprint
    rt.barrier()
    v_units = [verbalize_stage.unit_from_extract(u, extract_stage.out) for u in units]
    v_pending = _pending(verbalize_stage, v_units)
    v_mine = v_pending[rt.rank :: rt.world_size]
    todo = {(u.shard, u.index) for u in v_mine}
    e_pending = _pending(extract_stage, units)
    e_mine = [u for u in e_pending if (u.shard, u.index) in todo]
    first = process_units(extract_stage, cfg, rt, units, e_pending, e_mine)
    second = process_units(verbalize_stage, cfg, rt, v_units, v_pending, v_mine)
    return [first, second]
