"""Remote inputs (issue 11): ``data.paths`` URLs read through fsspec, from an HTTP server on 127.0.0.1
that this module starts itself (ranged reads, ETags, and faults on request), and ``file://`` globs.
No network: the server only listens on the loopback interface."""
import hashlib
import http.server
import io
import json
import re
import threading
import time

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import DataConfig, load_config
from pipeline.errors import PipelineError
from pipeline.io import remote
from pipeline.io.shards import check_no_nulls, find_duplicate_ids, plan_chunks, prompts_by_id, read_values, resolve_shards
from tests.conftest import write_parquet
from tests.test_bad_input import expect_error, final_files
from tests.test_extract import read_output
from tests.test_inputs import extract_argv
from tests.test_resume import cli, kill_when, read_stage

PROMPTS = {"prompt": ["What is 17 * 23?", "Name a colour.", "你好 🙂", "a", "The quick brown fox."],
           "id": ["r0", "r1", "r2", "r3", "r4"]}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler (files and directory listings) plus what object stores give and
    fsspec needs: ``Range`` requests (206) and an ``ETag`` (the content's md5). ``server.faults``
    maps a path to a status to answer with, or to "hang" (no answer until the test ends)."""

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def send_head(self):
        fault = self.server.faults.get(self.path)
        if fault == "hang":
            self.server.released.wait(30)
            return None
        if fault:
            self.send_error(fault)
            return None
        path = self.translate_path(self.path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (IsADirectoryError, FileNotFoundError):
            return super().send_head()
        start, stop, status = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match:  # bytes=a-b, bytes=a-, bytes=-n
            a, b = match.groups()
            start, stop = (len(data) - int(b), len(data)) if not a else (int(a), min(len(data), int(b or len(data) - 1) + 1))
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        return io.BytesIO(data[start:stop])


@pytest.fixture
def server(tmp_path):
    """(base URL, the directory it serves, the server): http://127.0.0.1:<free port>/ over ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.faults, httpd.released = {}, threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd
    httpd.released.set()
    httpd.shutdown()
    httpd.server_close()


def test_a_url_gives_exactly_what_the_local_file_gives(tmp_path, server, capsys):
    base, root, _ = server
    path = write_parquet(root / "prompts.parquet", PROMPTS, row_group_size=2)  # chunks cross row groups
    assert main(extract_argv(tmp_path / "local", path)) == 0
    url = f"{base}/prompts.parquet"
    assert main(extract_argv(tmp_path / "remote", url)) == 0
    ids, vectors, n_tokens, _ = read_output(tmp_path / "remote" / "extract")
    want_ids, want_vectors, want_tokens, _ = read_output(tmp_path / "local" / "extract")
    assert ids == want_ids == PROMPTS["id"] and n_tokens == want_tokens
    assert np.array_equal(vectors, want_vectors)
    assert sorted(p.name for p in (tmp_path / "remote" / "extract").iterdir() if p.is_dir()) == ["00000-prompts", "logs"]
    identity = json.loads((tmp_path / "remote" / "extract" / "_fingerprint.json").read_text())["settings"]["data.files"][url]
    assert identity == {"size": path.stat().st_size, "rows": 5, "etag": hashlib.md5(path.read_bytes()).hexdigest()}


def test_a_file_url_glob_matches_the_local_glob(tmp_path, capsys):
    for name in ("b", "a"):
        write_parquet(tmp_path / "in" / f"{name}.parquet", {"prompt": [f"{name} one", f"{name} two", f"{name} 3"]})
    assert main(extract_argv(tmp_path / "local", tmp_path / "in" / "*.parquet")) == 0
    assert main(extract_argv(tmp_path / "remote", f"file://{tmp_path}/in/*.parquet")) == 0
    ids, vectors, _, _ = read_output(tmp_path / "remote" / "extract")
    want_ids, want_vectors, _, _ = read_output(tmp_path / "local" / "extract")
    assert ids == want_ids == [f"0000{i}-{n}:{r}" for i, n in enumerate("ab") for r in range(3)]  # sorted, as locally
    assert np.array_equal(vectors, want_vectors)
    settings = json.loads((tmp_path / "remote" / "extract" / "_fingerprint.json").read_text())["settings"]
    assert "parquet_footer_sha256" in settings["data.files"][f"file://{tmp_path}/in/a.parquet"]  # no ETag here


def test_an_http_glob_lists_the_servers_directory(tmp_path, server):
    base, root, _ = server
    for name in ("b", "a", "c"):
        write_parquet(root / "d" / f"{name}.parquet", {"prompt": [name]})
    (root / "d" / "notes.txt").write_text("not an input")
    cfg = load_config(None, [f"data.paths=[{base}/d/*.parquet]"])
    assert [s.path for s in resolve_shards(cfg.data)] == [f"{base}/d/{n}.parquet" for n in "abc"]


def test_every_reader_of_inputs_reads_a_url(tmp_path, server):
    """The planning checks and the report's join read URLs row group by row group, as local files."""
    base, root, _ = server
    write_parquet(root / "a.parquet", {"id": ["x", "y", "x", "z"], "prompt": ["p0", "p1", None, "p3"]}, row_group_size=2)
    cfg = DataConfig(paths=[f"{base}/a.parquet"])
    shards = resolve_shards(cfg)
    assert find_duplicate_ids(shards, cfg) == (1, "x")
    assert prompts_by_id(shards, cfg, {"y", "z"}) == {"y": "p1", "z": "p3"}
    with pytest.raises(PipelineError, match=re.escape(f"{base}/a.parquet: row 2: prompt is None")):
        check_no_nulls(shards, cfg)


@pytest.mark.parametrize("fault, words", [(404, ["not found; check the URL"]), (401, ["access denied (HTTP 401)", "HF_TOKEN"]),
                                          (403, ["access denied (HTTP 403)"]), ("hang", ["no answer within 1 s"])])
def test_a_remote_failure_is_one_line_naming_the_url(tmp_path, server, capsys, fault, words):
    base, root, httpd = server
    write_parquet(root / "in.parquet", PROMPTS)
    httpd.faults["/in.parquet"] = fault
    url = f"{base}/in.parquet"
    began = time.monotonic()
    expect_error(capsys, extract_argv(tmp_path, url, **{"data.remote_timeout_s": 1}), url, *words)
    assert time.monotonic() - began < 20  # the timeout bounds a hung server, not aiohttp's 5 minutes
    assert final_files(tmp_path / "extract") == []


def test_a_url_that_is_not_parquet_is_named(tmp_path, server, capsys):
    base, root, _ = server
    (root / "in.parquet").write_bytes(b"<html>a login page</html>" * 10)
    expect_error(capsys, extract_argv(tmp_path, f"{base}/in.parquet"), f"{base}/in.parquet", "not a readable Parquet file")


def test_a_changed_remote_file_is_refused_on_resume(tmp_path, server, capsys):
    base, root, _ = server
    path = write_parquet(root / "in.parquet", PROMPTS)
    url = f"{base}/in.parquet"
    assert main(extract_argv(tmp_path, url)) == 0
    (tmp_path / "extract" / "00000-in" / "chunk_00001.arrow").unlink()  # an interrupted run, to resume
    write_parquet(path, {**PROMPTS, "prompt": [p.upper() for p in PROMPTS["prompt"]]})  # same name and rows
    capsys.readouterr()
    line = expect_error(capsys, extract_argv(tmp_path, url), f"data.files[{url}].etag", "--overwrite")
    assert hashlib.md5(path.read_bytes()).hexdigest() in line
    assert not (tmp_path / "extract" / "00000-in" / "chunk_00001.arrow").exists()  # nothing was run
    assert main(extract_argv(tmp_path, url) + ["--overwrite"]) == 0


@pytest.mark.parametrize("etag", [True, False])
def test_a_file_rewritten_after_planning_is_refused_when_read(tmp_path, server, etag):
    """Another process (or this one, after its cache let the file go) opens the URL later than the
    plan was made: the file it finds must be the one the plan describes."""
    base, root, _ = server
    path = write_parquet(root / "in.parquet", PROMPTS)
    url = f"{base}/in.parquet" if etag else f"file://{path}"
    cfg = load_config(None, [f"data.paths=[{url}]"])
    shards = resolve_shards(cfg.data)
    remote.open_parquet.cache_clear()
    write_parquet(path, {**PROMPTS, "prompt": [p * 2 for p in PROMPTS["prompt"]]})
    with pytest.raises(PipelineError, match=re.escape(url) + ": changed since the run was planned"):
        read_values(plan_chunks(shards, 2)[0], cfg.data)


def test_two_processes_killed_and_resumed_read_urls_as_one_reads_the_files(tmp_path, server, offline_cache):
    """Rank 1 opens the URLs itself, from rank 0's plan (and checks their versions against it)."""
    base, root, _ = server
    for name in ("a", "b"):
        write_parquet(root / f"{name}.parquet", {"id": [f"{name}{i}" for i in range(10)],
                                                 "prompt": [f"{name} prompt {i} " * (i + 1) for i in range(10)]},
                      row_group_size=3)
    cli(offline_cache, "extract", root, tmp_path / "local")  # data.paths=[root/*.parquet]
    urls = f"data.paths=[{base}/*.parquet]"  # the server's directory page, listed
    kill_when(offline_cache, "extract", root, tmp_path / "remote", "extract/*/chunk_*.arrow", 2, urls, procs=2)
    assert len(list((tmp_path / "remote").glob("extract/*/chunk_*.arrow"))) < 10  # killed midway
    cli(offline_cache, "extract", root, tmp_path / "remote", urls, procs=2)
    vectors, _, _ = read_stage(tmp_path / "remote")
    want, _, _ = read_stage(tmp_path / "local")
    assert list(vectors) == list(want) == [f"{n}{i}" for n in "ab" for i in range(10)]
    for key in want:
        np.testing.assert_array_equal(vectors[key], want[key])
