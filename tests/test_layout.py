"""Chunk files land atomically, also when written in the background."""
import threading

import pytest

from pipeline.io.layout import StageDir


def test_background_writes_land_before_leaving_and_overlap_the_caller(tmp_path):
    out = StageDir(tmp_path, ".txt")
    release = threading.Event()
    seen_tmp = []

    def slow(tmp):
        release.wait(5)
        seen_tmp.append(tmp.name)
        tmp.write_text("a")

    with out.background_writes():
        out.write_chunk(out.chunk_path("00000-x", 0), slow)
        assert not out.chunk_done("00000-x", 0)  # the caller was not held up by the write
        release.set()
        out.write_chunk(out.chunk_path("00000-x", 1), lambda tmp: tmp.write_text("b"))
    assert [p.read_text() for p in out.chunk_files()] == ["a", "b"]
    assert seen_tmp[0].startswith(".chunk_00000.txt.tmp-")
    assert not list(tmp_path.glob("**/.*"))


def test_a_failed_background_write_is_raised_and_leaves_no_file(tmp_path):
    out = StageDir(tmp_path, ".txt")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with out.background_writes():
            out.write_chunk(out.chunk_path("00000-x", 0), broken)
    assert out.chunk_files() == [] and not list(tmp_path.glob("**/.*tmp*"))


def test_an_error_in_the_caller_still_lets_the_started_write_land(tmp_path):
    out = StageDir(tmp_path, ".txt")
    with pytest.raises(RuntimeError):
        with out.background_writes():
            out.write_chunk(out.chunk_path("00000-x", 0), lambda tmp: tmp.write_text("done"))
            raise RuntimeError("the next chunk failed")
    assert [p.read_text() for p in out.chunk_files()] == ["done"]


def test_a_file_is_fsynced_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    out = StageDir(tmp_path, ".txt")
    final = out.chunk_path("00000-x", 0)
    out.write_atomic(final, lambda tmp: tmp.write_text("a"))
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert os.path.basename(events[0][1]).startswith(".chunk_00000.txt.tmp-")  # the temporary file
    assert events[2][1] == str(final.parent)  # then the directory that holds the new name


def test_temporary_names_carry_host_pid_and_a_random_part(tmp_path):
    import os
    import socket

    from pipeline.io.layout import temp_path, temp_target

    final = tmp_path / "chunk_00003.arrow"
    a, b = temp_path(final), temp_path(final)
    assert a != b  # two containers with the same pid on one host name still differ
    assert a.name.startswith(".chunk_00003.arrow.tmp-") and str(os.getpid()) in a.name
    assert socket.gethostname().split(".")[0][:10] in a.name
    assert temp_target(a.name) == "chunk_00003.arrow" and temp_target("chunk_00003.arrow") is None


def test_stale_temporary_files_are_judged_by_the_file_servers_clock(tmp_path):
    """Only what is over an hour older than the fingerprint file just written goes: a live temporary
    file of a concurrent job on a node whose clock runs 30 minutes behind is kept."""
    import os
    import time

    out = StageDir(tmp_path, ".txt")
    out.write_fingerprint("fp", {"stage": "extract"}, {})
    now = (tmp_path / "_fingerprint.json").stat().st_mtime
    shard = tmp_path / "00000-x"
    shard.mkdir()
    live, stale = shard / "._COMPLETE.tmp-nodeB-7-aa", shard / ".chunk_00001.txt.tmp-nodeA-7-bb"
    for path, age in ((live, 1800), (stale, 7200)):
        path.write_text("x")
        os.utime(path, (now - age, now - age))
    time.sleep(0.01)
    assert out.clean_stale_tmp() == 1
    assert live.exists() and not stale.exists()


def test_a_chunk_file_is_trusted_only_when_it_reads_with_the_planned_rows(tmp_path):
    import numpy as np

    from pipeline.io.activations import count_rows, write_activations

    out = StageDir(tmp_path, ".arrow", count_rows=count_rows)
    path = out.chunk_path("00000-x", 0)
    path.parent.mkdir(parents=True)
    write_activations(path, ["a", "b"], np.ones((2, 4), np.float32), [1, 1], {})
    assert out.chunk_problem("00000-x", 0, expected_rows=2) is None
    assert "holds 2 row(s), the plan 3" in out.chunk_problem("00000-x", 0, expected_rows=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "cannot be read" in out.chunk_problem("00000-x", 0, expected_rows=2)
    path.write_bytes(b"")
    assert "empty" in out.chunk_problem("00000-x", 0, expected_rows=2)
