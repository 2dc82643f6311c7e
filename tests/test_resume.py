"""Crash safety and scale-out: SIGKILL mid-shard and resume; two CPU processes; fingerprints; stray temps.

Every run here is a real CLI subprocess with OMP_NUM_THREADS=1, so all runs compute bit-identical
numbers and can be compared exactly with one uninterrupted single-process run.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, TINY_CONFIG, write_parquet

N_ROWS = 40
SETTINGS = ["data.chunk_rows=2", "generation.max_new_tokens=12", "verbalize.batch_size=2"]


def _env(cache):
    return {**os.environ, "NLA_PIPELINE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _argv(command, inputs, out, *extra, procs=1):
    launcher = [sys.executable, "-m", "pipeline"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "pipeline"]
    return [*launcher, command, "--config", TINY_CONFIG, f"data.paths=[{inputs}/*.parquet]",
            f"extract.output_dir={out}/extract", f"verbalize.output_dir={out}/verbalize", f"score.output_dir={out}/score",
            *SETTINGS, *extra]


def cli(cache, command, inputs, out, *extra, procs=1, ok=True):
    proc = subprocess.run(_argv(command, inputs, out, *extra, procs=procs), cwd=REPO, env=_env(cache),
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_when(cache, command, inputs, out, pattern, count, *extra, procs=1, hook=None):
    """Start a run and SIGKILL it (its whole process group) once `count` files match `pattern`."""
    env = {**_env(cache), **({"NLA_PIPELINE_TEST_HOOK": hook} if hook else {})}
    proc = subprocess.Popen(_argv(command, inputs, out, *extra, procs=procs), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob(pattern))) < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def read_stage(out):
    vecs = {}
    for f in sorted((out / "extract").glob("*/chunk_*.arrow")):
        with pa.memory_map(str(f)) as src:
            t = pa.ipc.open_stream(src).read_all()
        for i, v in zip(t.column("id").to_pylist(), t.column("activation").to_pylist()):
            assert i not in vecs, f"duplicate id {i}"
            vecs[i] = np.asarray(v)
    def rows(stage):
        files = sorted((out / stage).glob("*/chunk_*.parquet"))
        return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []

    return vecs, rows("verbalize"), rows("score")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    words = ["alpha", "国", "🙂", "loop", "数据", "zeta", "ok"]
    prompts = [" ".join(words[(i * j) % len(words)] for j in range(i % 9 + 1)) for i in range(N_ROWS)]
    write_parquet(d / "a.parquet", {"id": [f"a{i}" for i in range(N_ROWS // 2)], "prompt": prompts[: N_ROWS // 2]})
    write_parquet(d / "b.parquet", {"id": [f"b{i}" for i in range(N_ROWS // 2)], "prompt": prompts[N_ROWS // 2:]})
    return d


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory, inputs, offline_cache, tiny_adapter_dir):
    out = tmp_path_factory.mktemp("baseline")
    cli(offline_cache, "run", inputs, out)
    return out


@pytest.fixture(scope="module")
def baseline(baseline_dir):
    return read_stage(baseline_dir)


def assert_same(out, baseline, stages=("extract", "verbalize", "score")):
    vecs, rows, scores = read_stage(out)
    base_vecs, base_rows, base_scores = baseline
    assert list(vecs) == list(base_vecs)  # every id exactly once, in input order
    for k in base_vecs:
        np.testing.assert_array_equal(vecs[k], base_vecs[k])
    assert rows == base_rows
    assert len(rows) == N_ROWS
    if "score" in stages:
        assert scores == base_scores and len(scores) == N_ROWS
        assert json.loads((out / "score" / "_summary.json").read_text())["rows_scored"] == N_ROWS
    assert not list(out.rglob(".*.tmp-*"))
    for stage in stages:
        assert len(list((out / stage).glob("*/_COMPLETE"))) == 2


def test_sigkill_extract_then_verbalize_and_resume(tmp_path, inputs, baseline, offline_cache):
    kill_when(offline_cache, "extract", inputs, tmp_path, "extract/*/chunk_*.arrow", 3)
    done = len(list(tmp_path.glob("extract/*/chunk_*.arrow")))
    assert 3 <= done < N_ROWS // 2
    cli(offline_cache, "extract", inputs, tmp_path)
    kill_when(offline_cache, "verbalize", inputs, tmp_path, "verbalize/*/chunk_*.parquet", 2)
    status = cli(offline_cache, "status", inputs, tmp_path).stdout
    assert "extract" in status and "20/20 chunks done" in status and "pending" in status
    cli(offline_cache, "verbalize", inputs, tmp_path)
    assert_same(tmp_path, baseline, stages=("extract", "verbalize"))
    kill_when(offline_cache, "score", inputs, tmp_path, "score/*/chunk_*.parquet", 2, hook="chunk_delay@0=0.3")
    assert "score" in cli(offline_cache, "status", inputs, tmp_path).stdout
    cli(offline_cache, "score", inputs, tmp_path)
    assert_same(tmp_path, baseline)


def test_two_processes_match_one(tmp_path, inputs, baseline, offline_cache):
    cli(offline_cache, "run", inputs, tmp_path, procs=2)
    assert_same(tmp_path, baseline)
    for stage in ("extract", "verbalize"):
        logs = sorted(p.name for p in (tmp_path / stage / "logs").iterdir())
        assert logs == ["rank00000.log", "rank00000.timing.jsonl", "rank00001.log", "rank00001.timing.jsonl"]
        assert "rank 1 of 2" in (tmp_path / stage / "logs" / "rank00001.log").read_text()


def test_interrupted_two_process_run_resumes_with_one(tmp_path, inputs, baseline, offline_cache):
    kill_when(offline_cache, "run", inputs, tmp_path, "verbalize/*/chunk_*.parquet", 3, procs=2)
    cli(offline_cache, "run", inputs, tmp_path)
    assert_same(tmp_path, baseline)


def test_fingerprint_mismatch_is_refused(tmp_path, inputs, baseline, offline_cache):
    cli(offline_cache, "extract", inputs, tmp_path)
    proc = cli(offline_cache, "extract", inputs, tmp_path, "extract.layer=19", ok=False)
    assert proc.returncode == 1
    assert "extract.layer: 20 -> 19" in proc.stderr and "--overwrite" in proc.stderr
    cli(offline_cache, "run", inputs, tmp_path)  # the refusal changed nothing: same settings resume
    proc = cli(offline_cache, "verbalize", inputs, tmp_path, "generation.repetition_penalty=1.2", ok=False)
    assert proc.returncode == 1 and "generation.repetition_penalty: 1.05 -> 1.2" in proc.stderr
    cli(offline_cache, "verbalize", inputs, tmp_path, "generation.repetition_penalty=1.2", "--overwrite")
    _, rows, _ = read_stage(tmp_path)
    assert len(rows) == N_ROWS
    proc = cli(offline_cache, "score", inputs, tmp_path, "reconstructor.mse_scale=3.0", ok=False)
    assert proc.returncode == 1 and "mse_scale" in proc.stderr and "--overwrite" in proc.stderr


def test_stray_temporary_files_are_ignored_and_removed(tmp_path, inputs, baseline, offline_cache):
    cli(offline_cache, "extract", inputs, tmp_path)
    shard = tmp_path / "extract" / "00000-a"
    victim = shard / "chunk_00001.arrow"
    stray = shard / f".{victim.name}.tmp-4242"
    victim.rename(stray)  # a complete-looking file that never got its final name
    (shard / "_COMPLETE").unlink()
    half = tmp_path / "verbalize" / "00001-b" / ".chunk_00000.parquet.tmp-4243"
    half.parent.mkdir(parents=True)
    half.write_bytes(b"PAR1 half a file")
    for f in (stray, half):
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    assert "temporary file" in cli(offline_cache, "status", inputs, tmp_path).stdout
    cli(offline_cache, "run", inputs, tmp_path)
    assert_same(tmp_path, baseline)


def test_one_call_reads_a_whole_stage_in_input_order(tmp_path, baseline, inputs, offline_cache):
    import datasets

    cli(offline_cache, "run", inputs, tmp_path)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "verbalize" / "*" / "chunk_*.parquet"), split="train")
    assert ds["id"] == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]
    acts = datasets.load_dataset("arrow", data_files=str(tmp_path / "extract" / "*" / "chunk_*.arrow"), split="train")
    assert acts["id"] == ds["id"]


def test_a_rank_that_lists_late_skips_nothing(tmp_path, inputs, baseline, offline_cache):
    """Rank 1 waits 3 s before looking at its chunks (a slow metadata server, NFS attribute caching);
    rank 0 has finished chunks by then. The split must not depend on when a rank looks."""
    env = {"NLA_PIPELINE_TEST_HOOK": "delay_listing@1=3"}
    proc = subprocess.run(_argv("run", inputs, tmp_path, procs=2), cwd=REPO, env={**_env(offline_cache), **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "waits 3 s" in (tmp_path / "extract" / "logs" / "rank00001.log").read_text()  # the hook fired
    assert_same(tmp_path, baseline)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_start_up_error_on_one_rank_ends_every_rank_promptly(tmp_path, inputs, offline_cache):
    """Two processes started by hand (as srun starts them, with no torchrun agent to kill the
    survivors): rank 1 fails before the work is split. Rank 0 must not wait on a barrier until the
    process-group timeout (30 min); both exit 1 and the console shows one line, from rank 0."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**_env(offline_cache), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NLA_PIPELINE_TEST_HOOK": "fail_startup@1"}
        procs.append(subprocess.Popen(_argv("run", inputs, tmp_path), cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 1, err[-2000:]
        errs.append(err)
    lines = [line for err in errs for line in err.splitlines() if "error" in line.lower()]
    assert lines == ["nla-pipeline run: error: rank 1 failed while planning the run: "
                     "start-up failure injected by NLA_PIPELINE_TEST_HOOK"], errs
    assert "rank 1 failed" in (tmp_path / "extract" / "logs" / "rank00001.log").read_text()
    assert not list(tmp_path.glob("*/*/chunk_*"))


def test_truncated_chunk_files_are_redone_on_resume(tmp_path, inputs, baseline, baseline_dir, offline_cache):
    """A node crash on a write-back filesystem can leave a final name with no bytes, or half of them."""
    import shutil

    tmp_path = tmp_path / "out"
    shutil.copytree(baseline_dir, tmp_path)  # a finished run (the same inputs and settings)
    empty = tmp_path / "extract" / "00000-a" / "chunk_00002.arrow"
    half = tmp_path / "extract" / "00001-b" / "chunk_00004.arrow"
    empty_v = tmp_path / "verbalize" / "00001-b" / "chunk_00007.parquet"
    empty.write_bytes(b"")
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    empty_v.write_bytes(b"")
    proc = cli(offline_cache, "run", inputs, tmp_path)
    assert f"{empty}: the file is empty" in proc.stderr
    assert f"{half}: the file cannot be read" in proc.stderr
    assert f"{empty_v}: the file is empty" in proc.stderr
    assert_same(tmp_path, baseline)
