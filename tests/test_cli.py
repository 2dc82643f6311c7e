"""End to end through the installed entry point, in a subprocess, on the tiny offline model."""
import os
import subprocess
import sys

import pyarrow.parquet as pq

from tests.conftest import REPO, TINY_CONFIG, tiny_overrides


def test_run_command_end_to_end(tmp_path, offline_cache, tiny_adapter_dir):
    env = {**os.environ, "NLA_PIPELINE_CACHE": str(offline_cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", TINY_CONFIG, *tiny_overrides(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # Summary: rows, rows/s, where outputs are, three samples.
    assert "extract: 36 row(s)" in out and "verbalize: 36 row(s)" in out and "rows/s" in out
    assert str(tmp_path / "verbalize") in out
    assert out.count("  [sample-") == 3
    files = sorted((tmp_path / "verbalize").glob("*/chunk_*.parquet"))
    ids = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert ids == [f"sample-{i:03d}" for i in range(36)]
    assert (tmp_path / "extract" / "logs" / "rank00000.log").exists()
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_help_lists_every_key():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0
    for key in ("model.base", "model.adapter", "data.paths", "extract.output_dir", "extract.max_batch_tokens",
                "verbalize.batch_size", "generation.repetition_penalty"):
        assert key in proc.stdout
