"""``nla-pipeline report``: read a run's outputs and logs, write one self-contained HTML page.

    nla-pipeline report --config configs/tiny.yaml                       # outputs/tiny/report.html
    nla-pipeline report --config configs/tiny.yaml report.output=/tmp/run.html report.sample_rows=500

    from pipeline.report import write_report
    path = write_report(cfg)

Works on whatever stages have files; the page lists what is missing. Memory is bounded whatever the
run's size (pipeline.report.stats), and the page's size is fixed by ``report.sample_rows`` and
``report.best_worst``, not by the rows of the run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.io.layout import StageDir

log = logging.getLogger(__name__)


def report_path(cfg, stage_dirs: dict[str, str]) -> Path:
    """``report.output``, or report.html in the common parent of the stage output directories."""
    if cfg.report.output:
        return Path(cfg.report.output)
    parent = Path(os.path.commonpath([os.path.abspath(d) for d in stage_dirs.values()]))
    return parent / "report.html"


def write_report(cfg) -> Path:
    from pipeline.report.collect import collect_rows
    from pipeline.report.page import render_page
    from pipeline.report.plots import make_plots
    from pipeline.report.run_info import run_info, stage_dirs

    dirs = stage_dirs(cfg)
    info = run_info(cfg)
    rows = collect_rows(cfg, dirs)
    max_new = info["config"].get("generation", {}).get("max_new_tokens", cfg.generation.max_new_tokens)
    plots = make_plots(rows, max_new_tokens=max_new)
    text = render_page(info, rows, plots, cfg)
    path = report_path(cfg, dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    StageDir.write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("report: %d plot(s), %d table row(s), %.0f kB", len(plots), len(rows.sample.rows), len(text) / 1e3)
    return path
