"""The driver on a fake stage: one plan for every rank, filesystem lookups that grow linearly."""
from pathlib import Path

import pipeline.driver as driver
from pipeline.driver import Unit, process_units
from pipeline.io.layout import StageDir
from pipeline.runtime import Runtime


class FakeStage:
    """Writes one small text file per unit; no model."""

    name = "extract"

    def __init__(self, root: Path):
        self.out = StageDir(root, ".txt", count_rows=lambda p: len(p.read_text().splitlines()))
        self.processed = []

    def setup(self):
        pass

    def shard_info(self, shard, units):
        return {"chunks": len(units), "rows": sum(u.num_rows for u in units)}

    def process(self, unit, progress=None, prepared=None):
        self.processed.append((unit.shard, unit.index))
        self.out.write_chunk(self.out.chunk_path(unit.shard, unit.index),
                             lambda tmp: tmp.write_text("row\n" * unit.num_rows))
        return {}


class Rank0Of2(Runtime):
    """Rank 0 of a two-process job whose collectives are no-ops (the other rank is imaginary)."""

    def __init__(self):
        super().__init__(0, 2, None)

    def together(self, what):
        import contextlib

        return contextlib.nullcontext()

    def broadcast(self, obj):
        return obj

    def setup_logging(self, level, log_file=None):
        pass


class Cfg:
    log_level = "WARNING"


def test_rank0_progress_costs_a_listing_every_few_seconds_not_a_lookup_per_pending_chunk(tmp_path, monkeypatch):
    """With 400 chunks, the old bar checked every pending chunk's file after each chunk (~40k stats)."""
    units = [Unit(f"{s:05d}-x", i, 2, None) for s in range(2) for i in range(200)]
    stage = FakeStage(tmp_path)
    counts = {"exists": 0, "listing": 0}
    real_exists, real_listing = Path.exists, StageDir.listing
    monkeypatch.setattr(Path, "exists", lambda self: (counts.__setitem__("exists", counts["exists"] + 1),
                                                      real_exists(self))[1])
    monkeypatch.setattr(StageDir, "listing", lambda self, shards: (
        counts.__setitem__("listing", counts["listing"] + 1), real_listing(self, shards))[1])
    monkeypatch.setattr(driver, "PROGRESS_EVERY_S", 3600.0)
    result = process_units(stage, Cfg(), Rank0Of2(), units, units[0::2])
    assert result.chunks == 200 and len(stage.processed) == 200
    assert result.rows_in_output == 400  # rank 0's own 200 chunks (the imaginary rank 1 wrote nothing)
    assert counts["listing"] <= 6  # own files, progress start, two shards' last chunks, final sweep
    assert counts["exists"] <= 3 * len(units)  # temporary-file clean-up in write_atomic: linear


def test_a_shard_is_marked_complete_only_when_its_whole_extent_exists(tmp_path):
    stage = FakeStage(tmp_path)
    units = [Unit("00000-x", i, 1, None) for i in range(4)]
    process_units(stage, Cfg(), Rank0Of2(), units, units[0::2])  # rank 0's half only
    assert not stage.out.shard_complete("00000-x")
    for u in units[1::2]:  # rank 1's half lands; a later resume (any rank) marks the shard
        stage.out.write_atomic(stage.out.chunk_path(u.shard, u.index), lambda tmp: tmp.write_text("row\n"))
    process_units(stage, Cfg(), Rank0Of2(), units, units[0::2])
    assert stage.out.shard_marker("00000-x") == {"chunks": 4, "rows": 4}


def test_invalid_and_temporary_files_of_own_chunks_are_redone_and_removed(tmp_path, caplog):
    import logging

    stage = FakeStage(tmp_path)
    units = [Unit("00000-x", i, 2, None) for i in range(3)]
    process_units(stage, Cfg(), Rank0Of2(), units, units)
    assert stage.out.shard_complete("00000-x")
    stage.out.chunk_path("00000-x", 0).write_text("")              # a crash truncated it
    stage.out.chunk_path("00000-x", 1).write_text("row\n")         # one row of two
    stray = tmp_path / "00000-x" / ".chunk_00002.txt.tmp-otherhost-1-ab"
    stray.write_text("half")                                       # fresh, but this rank's own chunk
    stage.processed.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        process_units(stage, Cfg(), Rank0Of2(), units, units)
    assert stage.processed == [("00000-x", 0), ("00000-x", 1)]
    assert "chunk_00000.txt: the file is empty" in caplog.text and "holds 1 row(s), the plan 2" in caplog.text
    assert not stray.exists()
    assert stage.out.shard_complete("00000-x")
