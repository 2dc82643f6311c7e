"""The stage driver: plan once, refuse a mismatched resume, split the plan by rank, skip what is done.

    from pipeline.driver import run_stage
    result = run_stage(ExtractStage(cfg, rt), cfg, rt, overwrite=False)
    result.rows, result.seconds, result.out_dir

A stage object supplies ``name``, ``out`` (a StageDir), ``plan()`` (every Unit, in input order),
``settings()`` (what changes its outputs), ``shard_info(name, units)`` (the shard's whole extent,
``{"chunks": n, "rows": r}``, or None while it is not known), ``setup()`` (load models; called only
if there is work) and ``process(unit, progress, prepared)`` (write one chunk atomically, return its
stats; ``progress(n)``, when given, is called as rows finish). A stage may also offer
``prepare(unit)`` (read and tokenize), which the driver runs one unit ahead in a background thread,
and ``process_stream(units_and_prepared, progress)``, a generator of (unit, stats) that may work on
several units at once (verbalize keeps its decoder full across chunk boundaries), ``shared`` (what
its ``plan()`` computed that every rank needs: score's FVE baseline) and ``finish(units)`` (called
on each rank after its work has landed: score writes its summary there) and ``expected_rows(unit)``
(the rows a finished output file must hold, when that is not ``unit.num_rows``: under ``run``,
verbalize's units count extract's input rows, and extract.positions may read several per row). The driver sets
``stage.fingerprint`` (and ``stage.shared``) before ``setup()``. It owns the rest.

Work split, independent of timing: rank 0 alone lists the work (``plan()``), wipes on
``--overwrite`` and checks the fingerprint; every rank receives that one plan and takes
``units[rank::world_size]``, then checks its own units' files and skips the valid ones. No rank's
share depends on what another rank has finished, or on when it looked, so no chunk is skipped or
done twice, and a resume with another number of processes still covers every unit exactly once.
There is no collective once work starts: a rank with less work simply exits.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pipeline.config import fingerprint
from pipeline.io.layout import PROTOCOL
from pipeline.io.timing import TimingLog

log = logging.getLogger(__name__)

# Rank 0's progress bar counts every rank's finished files from a directory listing, at most this
# often (and at most every 20x the time the last listing took, on a slow filesystem).
PROGRESS_EVERY_S = 5.0


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
    skipped_chunks: int = 0  # this rank's units that were already done
    rows_in_output: int = 0  # finished rows on disk when this rank ended (all ranks' work)
    rows_planned: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _by_shard(units: list[Unit]) -> dict[str, list[Unit]]:
    shards: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        shards[u.shard].append(u)
    return shards


def prepare_output(stage, cfg, overwrite: bool) -> str:
    """Rank 0: wipe (on --overwrite), check and write the fingerprint, drop old temporary files."""
    settings = stage.settings()
    fp = fingerprint(settings)
    if overwrite:
        stage.out.wipe(stage.name, f"{stage.name}.output_dir")
    stage.out.check_fingerprint(fp, settings)
    stage.out.write_fingerprint(fp, settings, getattr(stage, "cfg", cfg).to_dict())  # resolved
    if hasattr(stage, "protocol_record"):  # each value of the protocol and where it came from
        record = json.dumps(stage.protocol_record(), indent=1, ensure_ascii=False, sort_keys=True)
        stage.out.write_atomic(stage.out.root / PROTOCOL, lambda tmp: tmp.write_text(record, encoding="utf-8"))
    removed = stage.out.clean_stale_tmp()
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", stage.name, removed)
    return fp


def _own_pending(stage, rt, mine: list[Unit]) -> list[Unit]:
    """This rank's units that still need doing. A final-named file counts as done only if it is
    valid; an invalid one (empty, unreadable, wrong row count) is removed with a warning, and so is
    its shard's marker (another rank may have counted the bad file and marked the shard meanwhile;
    it is marked again once the chunk is redone). Temporary files left for these units by an
    earlier run are removed too: no other rank of this job writes them."""
    rt.test_hook("delay_listing")
    listing = stage.out.listing({u.shard for u in mine})
    pending, removed = [], 0
    for shard, units in _by_shard(mine).items():
        names = listing[shard]
        removed += stage.out.remove_temps(shard, names, {stage.out.chunk_name(u.index) for u in units})
        for u in units:
            if stage.out.chunk_name(u.index) in names:
                expected = stage.expected_rows(u) if hasattr(stage, "expected_rows") else u.num_rows
                problem = stage.out.chunk_problem(u.shard, u.index, expected)
                if problem is None:
                    continue
                path = stage.out.chunk_path(u.shard, u.index)
                log.warning("%s: %s; it will be written again", path, problem)
                path.unlink(missing_ok=True)
                stage.out.unmark(u.shard)
            pending.append(u)
    if removed:
        log.info("%s: removed %d temporary file(s) an interrupted run left for this rank's chunks", stage.name, removed)
    return pending


def _mark_complete(stage, shards: dict[str, list[Unit]], listing: dict[str, set[str]] | None = None) -> None:
    """Write the marker of each shard whose whole extent (``stage.shard_info``) has final files."""
    listing = stage.out.listing(shards) if listing is None else listing
    for shard, units in shards.items():
        info = stage.shard_info(shard, units)
        if info is None or stage.out.shard_complete(shard):
            continue
        have = listing[shard]
        if all(stage.out.chunk_name(i) in have for i in range(info["chunks"])):
            stage.out.mark_complete(shard, {"chunks": info["chunks"], "rows": info["rows"]})


class _Progress:
    """Rows finished, as a tqdm bar on rank 0. A lone process counts its own chunks (and verbalize
    ticks it row by row); with many ranks, rank 0 counts every rank's finished files from one
    directory listing every few seconds, never a lookup per chunk per chunk."""

    def __init__(self, stage, rt, units: list[Unit], pending: list[Unit]):
        self.out, self.alone = stage.out, rt.world_size == 1
        self.shards = sorted({u.shard for u in units})
        self.rows = {(u.shard, stage.out.chunk_name(u.index)): u.num_rows for u in units}
        if self.alone:
            done = sum(self.rows.values()) - sum(u.num_rows for u in pending)
        else:  # only rank 0 shows a bar, so only rank 0 lists
            done = self._listed_rows() if rt.is_main else 0
        self.bar = tqdm(total=sum(self.rows.values()), initial=done, desc=stage.name, unit="row",
                        dynamic_ncols=True, disable=not rt.is_main)
        self.counted = done  # rows of finished chunks (lone process)
        self.next_listing = time.monotonic() + PROGRESS_EVERY_S
        self.tick = self.bar.update if self.alone else None

    def _listed_rows(self) -> int:
        listing = self.out.listing(self.shards)
        return sum(n for (shard, name), n in self.rows.items() if name in listing[shard])

    def chunk_done(self, unit: Unit) -> None:
        if self.alone:
            self.counted += unit.num_rows
            self.bar.update(max(0, self.counted - self.bar.n))  # ticks may already have counted them
        elif not self.bar.disable and time.monotonic() >= self.next_listing:
            started = time.monotonic()
            self.bar.update(self._listed_rows() - self.bar.n)
            self.next_listing = time.monotonic() + max(PROGRESS_EVERY_S, 20 * (time.monotonic() - started))


def process_units(stage, cfg, rt, units: list[Unit], mine: list[Unit]) -> StageResult:
    """Process this rank's share ``mine`` of the plan ``units``, marking shards complete as they fill
    up. No collective: under ``run`` a rank goes on to verbalize without waiting for the others."""
    rt.setup_logging(cfg.log_level, stage.out.log_path(rt.rank))
    pending = _own_pending(stage, rt, mine)
    result = StageResult(stage.name, str(stage.out.root), skipped_chunks=len(mine) - len(pending))
    log.info("%s: %d chunk(s) in all; rank %d of %d takes %d, %d already done, %d to do", stage.name, len(units),
             rt.rank, rt.world_size, len(mine), result.skipped_chunks, len(pending))
    timing = TimingLog(stage.out.timing_path(rt.rank), stage.name, rt.rank, rt.world_size)
    if pending:
        timing.start(len(pending))
        stage.setup()
        timing.ready()
    start = time.perf_counter()
    progress = _Progress(stage, rt, units, pending)
    left = {shard: len(us) for shard, us in _by_shard(pending).items()}  # this rank's units still to write
    all_shards = _by_shard(units)
    try:
        with stage.out.background_writes():
            for unit, stats in _processed(stage, pending, progress.tick):
                result.rows += unit.num_rows
                result.chunks += 1
                timing.chunk(unit, stats)  # per-rank throughput for `nla-pipeline report`
                for k, v in stats.items():
                    result.stats[k] = result.stats.get(k, 0) + v
                progress.chunk_done(unit)
                rt.test_hook("chunk_delay")
                left[unit.shard] -= 1
                if not left[unit.shard]:  # this rank's last chunk of the shard: can the shard be marked?
                    stage.out.flush()
                    _mark_complete(stage, {unit.shard: all_shards[unit.shard]})
                if "tokens" in result.stats:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    progress.bar.set_postfix(tok_s=f"{result.stats['tokens'] / elapsed:,.0f}", refresh=False)
    finally:
        progress.bar.close()
    result.seconds = time.perf_counter() - start
    # Every rank sweeps the shards it owns units of, after its own writes have landed: whichever
    # rank finishes a shard last then sees all of it.
    mine_shards = {u.shard for u in mine}
    listing = stage.out.listing(all_shards)
    _mark_complete(stage, {s: us for s, us in all_shards.items() if s in mine_shards}, listing)
    result.rows_planned = sum(u.num_rows for u in units)
    result.rows_in_output = sum(u.num_rows for u in units if stage.out.chunk_name(u.index) in listing[u.shard])
    if hasattr(stage, "finish"):
        stage.finish(units)
    if pending:
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


def _on_main(rt, what: str, make):
    """``make()`` on rank 0 alone; its result on every rank, or its error on every rank."""
    made = None
    with rt.together(what):
        rt.test_hook("fail_startup")
        if rt.is_main:
            made = make()
    return rt.broadcast(made)


def run_stage(stage, cfg, rt, overwrite: bool = False) -> StageResult:
    """One stage on its own: rank 0 plans, every rank takes ``units[rank::world_size]``."""
    rt.setup_logging(cfg.log_level, stage.out.log_path(rt.rank))

    def plan():
        units = stage.plan()  # inputs are checked before anything is wiped
        return units, prepare_output(stage, cfg, overwrite), getattr(stage, "shared", None)

    units, stage.fingerprint, stage.shared = _on_main(rt, f"planning {stage.name}", plan)
    return process_units(stage, cfg, rt, units, units[rt.rank :: rt.world_size])


def run_pipeline(extract_stage, verbalize_stage, cfg, rt, overwrite: bool = False,
                 score_stage=None) -> list[StageResult]:
    """Extract and verbalize with one split of the work: a rank verbalizes exactly the chunks it
    extracts (or finds extracted), so no rank waits for another between the two. Score, when given,
    runs third; its FVE baseline needs every vector of the run, so it starts once every rank has
    finished verbalizing (a collective that also ends every rank if one failed)."""
    rt.setup_logging(cfg.log_level, extract_stage.out.log_path(rt.rank))

    def plan():
        units = extract_stage.plan()
        fps = (prepare_output(extract_stage, cfg, overwrite),
               prepare_output(verbalize_stage, cfg, overwrite))  # after extract's: it records extract's fingerprint
        return units, fps

    units, (extract_stage.fingerprint, verbalize_stage.fingerprint) = _on_main(rt, "planning the run", plan)
    v_units = [verbalize_stage.unit_from_extract(u, extract_stage.out) for u in units]
    share = slice(rt.rank, None, rt.world_size)
    if score_stage is None:
        return [process_units(extract_stage, cfg, rt, units, units[share]),
                process_units(verbalize_stage, cfg, rt, v_units, v_units[share])]
    with rt.together("extracting and verbalizing"):
        results = [process_units(extract_stage, cfg, rt, units, units[share]),
                   process_units(verbalize_stage, cfg, rt, v_units, v_units[share])]
    s_units = [score_stage.unit_from_verbalize(u, verbalize_stage.out, extract_stage.out) for u in v_units]

    def plan_score():
        score_stage.shared = score_stage.baseline([u.source.activations for u in s_units])
        return prepare_output(score_stage, cfg, overwrite), score_stage.shared

    score_stage.fingerprint, score_stage.shared = _on_main(rt, "planning score", plan_score)
    return results + [process_units(score_stage, cfg, rt, s_units, s_units[share])]
