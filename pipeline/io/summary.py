"""The short report printed after a run: rows, rows/s, where outputs are, three sample explanations.

    from pipeline.io.summary import print_summary
    print_summary([extract_result, verbalize_result])     # rank 0 only
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _samples(out_dir: str, n: int = 3) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    from pipeline.io.layout import StageDir

    picked: list[tuple[str, str]] = []
    for path in StageDir(out_dir, ".parquet").chunk_files():
        table = pq.read_table(path, columns=["id", "explanation"])
        for row_id, text in zip(table.column("id").to_pylist(), table.column("explanation").to_pylist()):
            if text:
                picked.append((row_id, text))
            if len(picked) == n:
                return picked
    return picked


def _score_lines(out_dir: str) -> list[str]:
    """Mean FVE, and the best and worst explanation, from score's _summary.json (once it exists)."""
    import json
    from pathlib import Path

    path = Path(out_dir) / "_summary.json"
    if not path.exists():
        return ["  (the score summary is written once every chunk is scored)"]
    s = json.loads(path.read_text(encoding="utf-8"))
    if not s["rows_scored"]:
        return [f"  no row could be scored ({s['rows_failed']} failed)"]
    lines = [f"  mean FVE {s['fve_mean']:.3f} (median {s['fve_median']:.3f}), mean cosine {s['cosine_mean']:.3f}, "
             f"{s['rows_scored']} scored, {s['rows_failed']} failed; baseline {s['fve_baseline']:.4f}"]
    for label in ("best", "worst"):
        row = s[label]
        lines.append(f"  {label}: [{row['id']}] FVE {row['fve']:.3f} {row['explanation'][:140]!r}")
    return lines


def print_summary(results, world_size: int = 1) -> None:
    lines = []
    for r in results:
        line = f"{r.stage}: {r.rows} row(s) in {r.chunks} chunk(s), {r.seconds:.1f}s, {r.rows_per_s:.1f} rows/s"
        if world_size > 1:
            line = line.replace(":", " (rank 0):", 1)
        if r.skipped_chunks:
            line += f" ({r.skipped_chunks} chunk(s) already done)"
        if r.stats.get("computed_tokens"):
            from pipeline.stages.extract import padding_fraction

            line += f", padding {100 * padding_fraction(r.stats):.1f}%"
        if r.stats.get("error_rows"):
            line += f", {r.stats['error_rows']} row(s) not extracted (see the 'error' column)"
        if r.stats.get("truncated_rows"):
            line += f", {r.stats['truncated_rows']} row(s) cut to data.max_tokens (data.truncation)"
        if r.stats.get("bad_rows"):
            line += f", {r.stats['bad_rows']} bad vector(s) skipped (see the 'error' column)"
        lines.append(line + f"\n  output: {r.out_dir} ({r.rows_in_output}/{r.rows_planned} rows finished)")
        if r.stage == "score":
            lines.extend(_score_lines(r.out_dir))
        if r.stage == "verbalize":
            for row_id, text in _samples(r.out_dir):
                lines.append(f"  [{row_id}] {text[:160]!r}")
    print("\n".join(lines), flush=True)
