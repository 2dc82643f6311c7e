"""The report's plots: matplotlib figures from the streamed statistics, as base64 PNG for an <img>.

    from pipeline.report.plots import make_plots
    plots = make_plots(rows, max_new_tokens=120)   # [{"key", "title", "caption", "png"}]; a plot without data is left out

Figures are made with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot: no global
state, no display needed, safe in a process that makes several reports.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

BLUE, ORANGE, GREY = "#3b6ea8", "#d9822b", "#7a7a7a"


def _figure() -> Figure:
    fig = Figure(figsize=(5.6, 3.3), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _float_hist(hist, title: str, xlabel: str, color: str = BLUE) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    edges, counts = hist.bins()
    ax.stairs(counts, edges, fill=True, color=color, alpha=0.85)
    ax.axvline(hist.mean, color="black", lw=1, ls="--", label=f"mean {hist.mean:.4g}")
    ax.set(title=title, xlabel=xlabel, ylabel="rows")
    ax.legend(frameon=False, fontsize=8)
    return fig


def _int_edges(top: int, max_bins: int = 60) -> np.ndarray:
    """Bin edges for integers 0..top: one value a bin when few, else equal integer-wide bins."""
    step = max(1, int(np.ceil((top + 1) / max_bins)))
    return np.arange(0, top + step + 1, step) - 0.5


def _prompt_tokens(counts) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    table = counts.table()
    values = np.arange(len(table))
    ax.hist(values, bins=_int_edges(len(table) - 1), weights=table, color=BLUE, alpha=0.85)
    ax.set(title=f"Prompt length (mean {counts.mean():.1f}, max {counts.max()})",
           xlabel="tokens in the rendered prompt", ylabel="rows")
    return fig


def _generated(counts, max_new_tokens: int | None) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    size = len(counts.table())
    values = np.arange(size)
    finished, capped = counts.table(1), counts.table(0)
    edges = _int_edges(max(size - 1, max_new_tokens or 0))
    ax.hist([values, values], bins=edges, weights=[finished, capped], stacked=True, color=[BLUE, ORANGE],
            label=["finished (stop string or EOS)", "cut at max_new_tokens"], alpha=0.85)
    if max_new_tokens:
        ax.axvline(max_new_tokens, color=GREY, lw=1, ls=":")
    share = finished.sum() / max(1, counts.total())
    ax.set(title=f"Generated length: {100 * share:.1f}% finished before the cap", xlabel="tokens generated",
           ylabel="rows")
    ax.legend(frameon=False, fontsize=8)
    return fig


def _fve_by_length(hist) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    edges, grid = hist.grid(max_bins=40)  # grid [lengths, FVE bins]
    x_edges = np.arange(len(hist.counts) + 1) - 0.5
    mesh = ax.pcolormesh(x_edges, edges, np.ma.masked_equal(grid.T, 0), cmap="Blues",
                         norm=LogNorm(vmin=1, vmax=max(1, grid.max())), shading="flat")
    fig.colorbar(mesh, ax=ax, label="rows", format="%d")
    has = hist.group_n > 0
    lengths = np.flatnonzero(has)
    ax.set_xlim(lengths[0] - 0.5 - 0.02 * (lengths[-1] - lengths[0] + 1), lengths[-1] + 0.5)
    ax.plot(lengths, hist.group_total[has] / hist.group_n[has], color=ORANGE, lw=1.5, marker=".", ms=3,
            label="mean FVE at that length")
    ax.set(title="FVE against explanation length", xlabel="explanation length (tokens generated)", ylabel="FVE")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return fig


def make_plots(rows, max_new_tokens: int | None = None) -> list[dict]:
    """Every plot the data allows, in page order, each as {"key", "title", "caption", "png"}."""
    out = []

    def add(key, title, caption, make):
        out.append({"key": key, "title": title, "caption": caption, "png": _png(make())})

    n = lambda stage: f"{rows.rows.get(stage, 0):,}"  # noqa: E731 - a label helper
    if rows.norms.n:
        add("norms", "Activation norms", f"L2 norm of every extracted vector ({rows.norms.n:,} of {n('extract')} rows; "
            "error rows have none). The verbalizer rescales each to verbalizer.injection_norm.",
            lambda: _float_hist(rows.norms, "Activation L2 norm", "norm"))
    if rows.prompt_tokens.total():
        add("prompt_tokens", "Prompt token lengths", f"Tokens of each rendered prompt (chat template included), "
            f"{n('extract')} rows.", lambda: _prompt_tokens(rows.prompt_tokens))
    if rows.generated.total():
        add("generated", "Generated lengths", f"Tokens generated per row, {rows.generated.total():,} rows (rows "
            "verbalize skipped are left out); a row that reached max_new_tokens without a stop was cut.",
            lambda: _generated(rows.generated, max_new_tokens))
    if rows.cosine.n:
        add("cosine", "Cosine", f"Raw cosine between each vector and its reconstruction, {rows.cosine.n:,} scored rows. "
            "Activations share a mean direction, so read FVE.",
            lambda: _float_hist(rows.cosine, "Cosine(reconstruction, vector)", "cosine", GREY))
    if rows.fve.n:
        add("fve", "FVE", f"Fraction of variance explained, {rows.fve.n:,} scored rows: 0 is as good as predicting "
            "the mean vector, 1 is perfect.", lambda: _float_hist(rows.fve, "FVE", "FVE"))
        add("fve_length", "FVE against explanation length", "Rows per (length, FVE) cell, log colour scale, with "
            "the mean FVE at each length.", lambda: _fve_by_length(rows.fve_by_length))
    return out
