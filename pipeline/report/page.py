"""The report's one self-contained HTML page: inline CSS and script, plots as data: URIs, no network.

    from pipeline.report.page import render_page
    html_text = render_page(info, rows, plots, cfg)   # info: run_info(), rows: collect_rows(), plots: make_plots()

Every value from the run (prompts, explanations, ids, paths, settings) goes through ``html.escape``.
The tables are plain HTML rows, readable without the script; the inline script only adds search
(a case-insensitive substring over a row's text) and sorting (click a column header).
"""
from __future__ import annotations

import html
import json

import yaml

from pipeline.report.collect import PROMPT_CHARS
from pipeline.report.script import CSS, SCRIPT


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, fmt: str = "{:,.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _table(headers: list[str] | None, rows: list[list], cls: str = "") -> str:
    """``rows`` hold HTML already escaped; ``headers`` None for a two-column table of facts."""
    head = "" if headers is None else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _run_section(info: dict) -> str:
    c = info["config"]
    model = c.get("model", {})
    stages = info["stages"]
    first = lambda key: next((s[key] for s in stages.values() if s.get(key)), None)  # noqa: E731
    versions = sorted({s["metadata"].get("nla_pipeline_version") for s in stages.values()} - {None})
    facts = [["base model", _e(model.get("base"))], ["adapter", _e(model.get("adapter"))],
             ["verbalizer", _e(model.get("verbalizer"))],
             ["reconstructor", _e(model.get("reconstructor"))], ["layer", _e(c.get("extract", {}).get("layer"))],
             ["dtype", _e(model.get("dtype"))],
             ["written by nla-pipeline", _e(", ".join(versions) or "unknown")],
             ["report by nla-pipeline", _e(info["version"])],
             ["first chunk written", _e(first("first_write"))],
             ["last chunk written", _e(max((s["last_write"] for s in stages.values() if s["last_write"]), default=None))],
             ["report generated", _e(info["generated"])]]
    out = [_table(None, facts, "facts")]
    rows = []
    for s in stages.values():
        st = s["status"] or {}
        rows.append([_e(s["name"]), f"<code>{_e(s['dir'])}</code>",
                     _e(f"{st['chunks_done']}/{st['chunks']}" if st else f"{s['files']}/?"),
                     _e(st["chunks"] - st["chunks_done"] if st else "?"),
                     _e(f"{st['rows_done']:,}/{st['rows']:,}" if st else "?"),
                     _num(s["wall_seconds"], "{:,.1f} s"), _e(s["started"]), _e(s["ended"]),
                     f"<code>{_e(s['fingerprint'])}</code>"])
    out.append("<h3>Stages</h3>" + _table(["stage", "directory", "chunks done", "pending", "rows done", "wall time",
                                           "started", "ended", "fingerprint"], rows, "stages"))
    out.append(_throughput(stages))
    summary = stages.get("score", {}).get("summary")
    if summary and summary.get("rows_scored"):
        out.append("<h3>Score</h3>" + _table(None, [
            ["rows scored / failed", _e(f"{summary['rows_scored']:,} / {summary['rows_failed']:,}")],
            ["FVE mean / median", _e(f"{summary['fve_mean']:.4f} / {summary['fve_median']:.4f}")],
            ["cosine mean / median", _e(f"{summary['cosine_mean']:.4f} / {summary['cosine_median']:.4f}")],
            ["FVE baseline", _e(f"{summary['fve_baseline']:.6g} ({summary.get('fve_baseline_source')})")]], "facts"))
    details = []
    for s in stages.values():
        if s["settings"]:
            details.append(f"<details><summary>{_e(s['name'])}: the settings behind fingerprint "
                           f"{_e(s['fingerprint'])}</summary><pre>{_e(json.dumps(s['settings'], indent=1, ensure_ascii=False))}"
                           "</pre></details>")
        logs = s["logs"]
        if logs["files"]:
            lines = "\n".join(logs["last"]) or "(none)"
            details.append(f"<details><summary>{_e(s['name'])}: {len(logs['files'])} log file(s), "
                           f"{logs['warnings']} warning(s), {logs['errors']} error(s)</summary>"
                           f"<pre>{_e(lines)}</pre></details>")
    details.append(f"<details><summary>config (from {_e(info['config_from'])})</summary>"
                   f"<pre>{_e(yaml.safe_dump(c, sort_keys=False, allow_unicode=True))}</pre></details>")
    return "\n".join(out + details)


def _throughput(stages: dict) -> str:
    rows = []
    for s in stages.values():
        if s["ranks"]:
            for rank, r in s["ranks"].items():
                rows.append([_e(s["name"]), _e(rank), _e(int(r.get("sessions", 0))), _e(int(r.get("chunks", 0))),
                             _e(f"{int(r.get('rows', 0)):,}"), _num(r.get("setup_seconds"), "{:,.1f} s"),
                             _num(r.get("seconds"), "{:,.1f} s"), _num(r["rows_per_s"]),
                             _num(r["tokens_per_s"], "{:,.0f}") + f" <small>{_e(s['tokens_label'])}</small>"])
        for rank, r in s["logs"]["wrote"].items() if not s["ranks"] else ():
            rows.append([_e(s["name"]), _e(rank), "—", _e(r["chunks"]), _e(f"{r['rows']:,}"), "—",
                         _num(r["seconds"], "{:,.1f} s"), _num(r["rows"] / r["seconds"] if r["seconds"] else None),
                         "— <small>(text log)</small>"])
    if not rows:
        return "<h3>Throughput per rank</h3><p>No timing records or log lines yet.</p>"
    return ("<h3>Throughput per rank</h3><p class=note>Compute time excludes model loading (set-up); a resumed "
            "stage adds its sessions.</p>" + _table(["stage", "rank", "sessions", "chunks", "rows", "set-up",
                                                    "compute", "rows/s", "tokens/s"], rows, "ranks"))


def _plots_section(plots: list[dict]) -> str:
    if not plots:
        return "<p>No data to plot yet.</p>"
    figs = [f'<figure id="plot-{_e(p["key"])}"><img alt="{_e(p["title"])}" src="data:image/png;base64,{p["png"]}">'
            f'<figcaption>{_e(p["caption"])}</figcaption></figure>' for p in plots]
    return f'<div class="plots">{"".join(figs)}</div>'


def _row_cells(r: dict, position: bool) -> str:
    fve = r.get("fve")
    prompt = r.get("prompt")
    cells = [f"<td>{_e(r['id'])}</td>",
             f'<td class="prompt">{_e(prompt) if prompt is not None else "<i>—</i>"}</td>']
    if position:
        cells.append(f'<td data-v="{_e(r.get("position"))}">{_e(r.get("position"))}</td>')
    expl = _e(r.get("explanation"))
    if r.get("error"):
        expl += f'<div class="err">{_e(r["error"])}</div>'
    finished = r.get("finished")
    cells += [f'<td class="expl">{expl}</td>', f"<td>{'' if finished is None else ('yes' if finished else 'no')}</td>",
              f'<td data-v="{_e(r.get("n_generated"))}">{_e(r.get("n_generated"))}</td>',
              f'<td data-v="{"" if fve is None else f"{fve:.6g}"}">{_num(fve, "{:.4f}")}</td>']
    return "<tr>" + "".join(cells) + "</tr>"


def _rows_table(rows: list[dict], position: bool, table_id: str) -> str:
    headers = ["id", "prompt"] + (["position"] if position else []) + ["explanation", "finished", "n_generated", "FVE"]
    numeric = {"position", "n_generated", "FVE"}
    head = "".join(f'<th class="{"num" if h in numeric else ""}" title="click to sort">{_e(h)}</th>' for h in headers)
    body = "".join(_row_cells(r, position) for r in rows)
    return f'<table id="{table_id}" class="rows sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _explanations_section(rows, cfg) -> str:
    sample = rows.sample
    total = rows.rows.get(rows.primary, 0)
    if not sample.rows:
        return "<p>No rows yet.</p>"
    how = (f"all {total:,} rows" if len(sample.rows) >= total else
           f"{len(sample.rows):,} of {total:,} rows, drawn uniformly at random without replacement: each id's "
           f"seeded hash (report.seed={cfg.report.seed}) ranks it, and the {len(sample.rows):,} lowest are shown "
           f"(report.sample_rows={cfg.report.sample_rows})")
    note = f"<p class=note>The table holds {_e(how)}, from the {_e(rows.primary)} files, in input order. "
    note += f"Prompts are shortened to {PROMPT_CHARS} characters.</p>"
    if rows.prompts_note:
        note += f'<p class="warn">{_e(rows.prompts_note)}</p>'
    search = ('<input id="search" type="search" placeholder="search id, prompt, explanation…" autocomplete="off">'
              ' <span id="shown"></span>')
    return note + search + _rows_table(sample.rows, rows.has_position, "explanations")


def _extremes_section(rows) -> str:
    ex = rows.extremes
    if not ex.best:
        return ""
    best = [r for _, r in ex.best]
    worst = [r for _, r in ex.worst]
    return (f"<h2 id=best>Best {len(best)} by FVE</h2>" + _rows_table(best, False, "best")
            + f"<h2 id=worst>Worst {len(worst)} by FVE</h2>" + _rows_table(worst, False, "worst"))


def render_page(info: dict, rows, plots: list[dict], cfg) -> str:
    missing = "".join(f"<li>{_e(m)}</li>" for m in info["missing"])
    missing = f'<div class="missing"><b>Missing from this run</b><ul>{missing}</ul></div>' if missing else ""
    model = info["config"].get("model", {}).get("base", "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>nla-pipeline report: {_e(model)}</title>
<style>{CSS}</style></head>
<body>
<h1>nla-pipeline report</h1>
<nav><a href="#run">run</a> · <a href="#plots">plots</a> · <a href="#best">best / worst</a> ·
<a href="#table">explanations</a></nav>
{missing}
<h2 id="run">The run</h2>
{_run_section(info)}
<h2 id="plots">Plots</h2>
<p class=note>Every row of every finished chunk file.</p>
{_plots_section(plots)}
{_extremes_section(rows)}
<h2 id="table">Explanations</h2>
{_explanations_section(rows, cfg)}
<script>{SCRIPT}</script>
</body></html>
"""
