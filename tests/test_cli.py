"""End to end through the installed entry point, in a subprocess, on the tiny offline model."""
import subprocess
import sys

import pyarrow.parquet as pq

from tests.conftest import REPO


def test_run_command_end_to_end(tiny_run):
    tmp_path, proc = tiny_run  # conftest: `nla-pipeline run --config configs/tiny.yaml`, once per session
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
