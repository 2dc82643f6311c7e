"""Chunk files land atomically, also when written in the background."""
import threading

import pytest

from pipeline.layout import StageDir


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
