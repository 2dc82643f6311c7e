"""``nla-pipeline report``: the tiny run end to end, then its page in a real headless browser, offline.

The browser test needs Chromium (Debian's ``chromium``; ``.ci/run`` installs it) and websocket-client
(the ``test`` extra). Outside CI it is skipped, with the reason, when either is missing; in CI
(``CI=true``) it fails instead, so a CI without a browser cannot pass it silently.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.browser import Browser, find_chromium
from tests.conftest import REPO, TINY_CONFIG, tiny_overrides

SAMPLE, BEST_WORST = 20, 5
IMAGES = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _browser_or_skip() -> str:
    chromium = find_chromium()
    missing = None if chromium else "no chromium on PATH (apt-get install chromium)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        missing = missing or "websocket-client is not installed (pip install -e '.[test]')"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    return chromium


def _report(run_dir, *extra, cache):
    env = {**os.environ, "NLA_PIPELINE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline", "report", "--config", TINY_CONFIG, *tiny_overrides(run_dir), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _explanation_ids(run_dir) -> list[str]:
    files = sorted((run_dir / "verbalize").glob("*/chunk_*.parquet"))
    return [i for f in files for i in pq.read_table(f).column("id").to_pylist()]


def INPUT_PROMPTS() -> dict[str, str]:  # noqa: N802 - the bundled prompts configs/tiny.yaml reads
    from pipeline.io.shards import sample_prompts_path

    t = pq.read_table(sample_prompts_path())
    return dict(zip(t.column("id").to_pylist(), t.column("prompt").to_pylist()))


def _shortened(prompt: str) -> str:
    from pipeline.report.collect import PROMPT_CHARS

    return prompt if len(prompt) <= PROMPT_CHARS else prompt[: PROMPT_CHARS - 1] + "…"


ROWS = "Array.from(document.querySelectorAll('#explanations tbody tr'))"
PLOTS = """Promise.all(Array.from(document.images).map(function (img) {
  return img.decode().then(function () {
    var c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    var g = c.getContext('2d'); g.drawImage(img, 0, 0);
    var d = g.getImageData(0, 0, c.width, c.height).data, colours = {};
    for (var i = 0; i < d.length; i += 4) { colours[d[i] + ',' + d[i + 1] + ',' + d[i + 2]] = 1; }
    return {alt: img.alt, width: img.naturalWidth, height: img.naturalHeight, colours: Object.keys(colours).length};
  }, function (e) { return {alt: img.alt, error: String(e)}; });
}))"""


def test_report_page_in_a_headless_browser(tiny_run, tmp_path, offline_cache):
    chromium = _browser_or_skip()
    run_dir, _ = tiny_run
    page_path = tmp_path / "report.html"
    proc = _report(run_dir, f"report.output={page_path}", f"report.sample_rows={SAMPLE}",
                   f"report.best_worst={BEST_WORST}", cache=offline_cache)
    assert proc.stdout.strip().splitlines()[-1] == str(page_path)
    text = page_path.read_text(encoding="utf-8")
    assert len(text) < 1_000_000
    assert not re.search(r'(src|href)="(https?:)?//', text), "the page must load nothing from the network"
    assert "Missing from this run" not in text  # a finished run lacks nothing
    for png in IMAGES.findall(text):  # the embedded files are PNG, whatever the browser makes of them
        assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"

    with Browser(chromium, tmp_path / "chromium-profile") as browser:
        page = browser.open(page_path)
        plots = page.evaluate(PLOTS)
        assert [p["alt"] for p in plots] == ["Activation norms", "Prompt token lengths", "Generated lengths", "Cosine",
                                             "FVE", "FVE against explanation length"]
        for p in plots:  # decoded, of a real size, and not one flat colour
            assert "error" not in p and p["width"] >= 300 and p["height"] >= 200 and p["colours"] > 10, p

        # The table: a sample of SAMPLE distinct ids of the run, in input order; best and worst tables too.
        ids = page.evaluate(f"{ROWS}.map(r => r.cells[0].textContent)")
        all_ids = _explanation_ids(run_dir)
        assert len(ids) == SAMPLE == len(set(ids)) and set(ids) <= set(all_ids)
        assert ids == sorted(ids, key=all_ids.index)
        assert f"{SAMPLE} of {len(all_ids)} rows" in page.evaluate("document.body.textContent")
        prompts = page.evaluate(f"{ROWS}.map(r => r.cells[1].textContent)")
        assert prompts == [_shortened(INPUT_PROMPTS()[i]) for i in ids]  # joined back from the input file by id
        for table in ("best", "worst"):
            assert page.evaluate(f"document.querySelectorAll('#{table} tbody tr').length") == BEST_WORST

        # Typing in the search box filters the rows; clearing it shows them all again.
        texts = page.evaluate(f"{ROWS}.map(r => r.textContent.toLowerCase())")
        query = ids[3]
        page.type_text("#search", query)
        visible = page.evaluate(f"{ROWS}.filter(r => !r.hidden).map(r => r.cells[0].textContent)")
        assert visible == [i for i, t in zip(ids, texts) if query.lower() in t] and ids[3] in visible
        assert len(visible) < SAMPLE
        page.clear("#search")
        page.type_text("#search", "no row holds this text")
        assert page.evaluate(f"{ROWS}.filter(r => !r.hidden).length") == 0
        assert page.evaluate("document.getElementById('shown').textContent") == f"0 of {SAMPLE} rows shown"
        page.clear("#search")
        assert page.evaluate(f"{ROWS}.filter(r => !r.hidden).length") == SAMPLE

        # A click on the FVE header sorts by it, a second click reverses.
        fve_header = "Array.from(document.querySelectorAll('#explanations th')).find(h => h.textContent == 'FVE')"
        page.evaluate(f"{fve_header}.click()")
        fve = page.evaluate(f"{ROWS}.map(r => parseFloat(r.lastElementChild.getAttribute('data-v')))")
        assert fve == sorted(fve)
        page.evaluate(f"{fve_header}.click()")
        assert page.evaluate(f"{ROWS}.map(r => parseFloat(r.lastElementChild.getAttribute('data-v')))") == sorted(fve)[::-1]

        shot = page.screenshot(tmp_path / "report.png")
        assert page.errors() == []
        assert {u.split(":", 1)[0] for u in page.requests()} <= {"file", "data"}, page.requests()
    assert shot.stat().st_size > 10_000


def test_report_of_a_partial_run_says_what_is_missing(tiny_run, tmp_path):
    """Extract finished, verbalize one chunk short, no score: the page says so, plots what exists,
    and its table (every row: sample_rows is larger than the run) holds the explained rows."""
    from pipeline.config import load_config
    from pipeline.report import write_report

    run_dir, _ = tiny_run
    for stage in ("extract", "verbalize"):
        shutil.copytree(run_dir / stage, tmp_path / stage)
    (tmp_path / "verbalize" / "00000-sample_prompts" / "chunk_00001.parquet").unlink()
    cfg = load_config(TINY_CONFIG, tiny_overrides(tmp_path) + ["model.reconstructor=null"])
    path = write_report(cfg)
    assert path == tmp_path / "report.html"  # beside the stage directories
    text = path.read_text(encoding="utf-8")
    assert "Missing from this run" in text
    assert "verbalize: 1 of 3 chunk(s) pending (16 row(s))" in text
    assert "score: not part of this run" in text
    assert 'alt="Activation norms"' in text and 'alt="Generated lengths"' in text and 'alt="FVE"' not in text
    table = text.split('id="explanations"', 1)[1]
    shown = re.findall(r"<tr><td>(sample-\d+)</td>", table)
    assert shown == _explanation_ids(tmp_path) and len(shown) == 20
    assert "all 20 rows" in text


def test_timing_records_give_per_rank_throughput(tiny_run):
    from pipeline.io.timing import read_timing

    run_dir, _ = tiny_run
    ranks, wall, span = read_timing(run_dir / "verbalize" / "logs")
    assert list(ranks) == [0]
    r = ranks[0]
    assert r["rows"] == 36 and r["chunks"] == 3 and r["sessions"] == 1 and r["generated_tokens"] > 0
    assert 0 < r["seconds"] <= wall and r["setup_seconds"] > 0 and span[0] < span[1]


def test_timing_survives_a_cut_line_and_counts_overlap_once(tmp_path):
    from pipeline.io.timing import read_timing

    logs = tmp_path / "logs"
    logs.mkdir()
    lines = {0: [{"event": "start", "time": 100.0}, {"event": "chunk", "time": 110.0, "rows": 4, "seconds": 10, "tokens": 40},
                 {"event": "start", "time": 200.0}, {"event": "chunk", "time": 205.0, "rows": 2, "seconds": 5}],
             1: [{"event": "start", "time": 105.0}, {"event": "chunk", "time": 115.0, "rows": 3, "seconds": 10}]}
    for rank, records in lines.items():
        body = "".join(json.dumps({**r, "rank": rank}) + "\n" for r in records)
        (logs / f"rank{rank:05d}.timing.jsonl").write_text(body + '{"event": "chunk", "ti')  # killed mid-line
    ranks, wall, span = read_timing(logs)
    assert ranks[0]["rows"] == 6 and ranks[0]["sessions"] == 2 and ranks[0]["tokens"] == 40 and ranks[1]["rows"] == 3
    assert wall == pytest.approx(15 + 5) and span == (100.0, 205.0)  # [100, 115] and [200, 205]


def test_sample_does_not_depend_on_read_order_and_histograms_grow():
    from pipeline.report.stats import Extremes, Histogram, Sample

    ids = np.array([f"row-{i}" for i in range(20_000)], dtype=object)

    def draw(batches):
        s = Sample(50, seed=3)
        for b in batches:
            s.add(b, lambda idx, b=b: [{"id": b[i]} for i in idx])
        return sorted(r["id"] for r in s.rows)

    forward = draw(np.array_split(ids, 17))
    assert len(forward) == 50 and forward == draw(np.array_split(ids[::-1], 5))
    assert draw([ids]) == forward
    h = Histogram()
    rng = np.random.default_rng(0)
    chunks = [rng.normal(10 * i, 1 + i, 500) for i in range(30)]  # the range keeps moving up
    for c in chunks:
        h.add(c)
    data = np.concatenate(chunks)
    edges, counts = h.bins(60)
    assert counts.sum() == len(data) and len(counts) <= 60 and edges[0] <= data.min() and edges[-1] >= data.max()
    assert h.quantile(0.5) == pytest.approx(np.median(data), abs=(data.max() - data.min()) / 500)
    e = Extremes(3)
    values = rng.normal(size=1000)
    for start in range(0, 1000, 64):
        e.add(values[start:start + 64], lambda idx, s=start: [{"i": s + i} for i in idx])
    assert [r["i"] for _, r in e.best] == list(np.argsort(values)[::-1][:3])
    assert [r["i"] for _, r in e.worst] == list(np.argsort(values)[:3])
