"""Per-chunk timing, one JSON line per event in ``<output_dir>/logs/rankNNNNN.timing.jsonl``.

    from pipeline.io.timing import TimingLog, read_timing
    timing = TimingLog(out.timing_path(rank), "extract", rank, world_size)
    timing.start(pending_chunks=12)           # before the models load
    timing.ready()                            # after: the gap is the set-up time
    timing.chunk(unit, {"tokens": 4096})      # each chunk as it is handed to the writer
    per_rank, wall_seconds = read_timing(out.root / "logs")   # what `nla-pipeline report` shows

A line is ``{"event": "start"|"ready"|"chunk", "time": <unix s>, "rank", "world_size", ...}``; a chunk
line adds ``shard``, ``chunk``, ``rows``, ``seconds`` (since the rank's previous event, so a rank's
chunk seconds add up to its compute time however many chunks its decoder holds at once) and the
stage's own counters (``tokens``, ``generated_tokens``, ...). The text log says the same in words;
this file exists so that a report need not parse sentences. Each rank appends to its own file, and a
resumed run appends a new ``start``: the file is the history of every session in that directory. A
line cut short by a kill is skipped when read.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)


class TimingLog:
    def __init__(self, path: Path, stage: str, rank: int, world_size: int):
        self.path, self.stage, self.rank, self.world_size = Path(path), stage, rank, world_size
        self.last = time.time()
        self.broken = False

    def _write(self, event: str, **fields) -> None:
        now = time.time()
        record = {"event": event, "stage": self.stage, "time": round(now, 3), "rank": self.rank,
                  "world_size": self.world_size, **fields}
        self.last = now
        if self.broken:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as e:  # timing is for the report: losing it must not stop the run
            self.broken = True
            log.warning("%s: cannot append timing (%s); the report will lack this rank's throughput", self.path, e)

    def start(self, pending_chunks: int) -> None:
        self._write("start", pending_chunks=pending_chunks)

    def ready(self) -> None:
        self._write("ready", setup_seconds=round(time.time() - self.last, 3))

    def chunk(self, unit, stats: dict) -> None:
        seconds = round(time.time() - self.last, 4)
        counters = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._write("chunk", shard=unit.shard, chunk=unit.index, rows=unit.num_rows, seconds=seconds, **counters)


def _records(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run
                continue
            if isinstance(record, dict) and "event" in record and "time" in record:
                yield record


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def read_timing(logs_dir: Path) -> tuple[dict[int, dict], float, tuple[float, float] | None]:
    """(per rank {rows, chunks, seconds, setup_seconds, sessions, counters...}, wall seconds, (first, last)
    unix time) of one stage directory's timing files. Wall seconds are the union of every session's
    span (start to last chunk) over all ranks: concurrent ranks count once, gaps between runs not at all."""
    ranks: dict[int, dict] = defaultdict(lambda: defaultdict(float))
    intervals: list[list[float]] = []
    for path in sorted(Path(logs_dir).glob("rank*.timing.jsonl")):
        current = None
        for r in _records(path):
            rank = ranks[int(r.get("rank", 0))]
            if r["event"] == "start":
                current = [r["time"], r["time"]]
                intervals.append(current)
                rank["sessions"] += 1
            elif r["event"] == "ready":
                rank["setup_seconds"] += r.get("setup_seconds", 0)
            elif r["event"] == "chunk":
                if current is None:  # a file whose start line was lost: the chunk alone
                    current = [r["time"] - r.get("seconds", 0), r["time"]]
                    intervals.append(current)
                current[1] = max(current[1], r["time"])
                rank["chunks"] += 1
                for k, v in r.items():
                    if k not in ("event", "time", "rank", "world_size", "chunk", "stage") and isinstance(v, (int, float)):
                        rank[k] += v
    span = (min(a for a, _ in intervals), max(b for _, b in intervals)) if intervals else None
    return {k: dict(v) for k, v in sorted(ranks.items())}, _union_seconds([tuple(i) for i in intervals]), span
