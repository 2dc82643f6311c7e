"""The benchmark script runs end to end (smoke size) and writes its table."""
import os
import subprocess
import sys

from tests.conftest import REPO


def test_bench_quick_writes_a_table(tmp_path, offline_cache, tiny_model_dir):
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "NLA_PIPELINE_CACHE": str(offline_cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    for row in ("| extract | card, per example |", "| extract | pipeline |", "| verbalize | card, per example |",
                "| verbalize | pipeline |"):
        assert row in text
    assert "python scripts/bench.py --quick" in text and "GFLOP/s" in text
