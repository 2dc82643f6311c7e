"""``nla-pipeline status``: per stage, the chunks done and pending and the rows done. Loads no model.

    nla-pipeline status --config configs/tiny.yaml

    extract    outputs/tiny/extract     3/3 chunks done (0 pending), 36/36 rows, 1/1 shards complete
    verbalize  outputs/tiny/verbalize   1/3 chunks done (2 pending), 16/36 rows, 0/1 shards complete

Each stage is planned from what it reads: extract from ``data.paths``, verbalize from the activation
files in ``verbalize.input_dir`` (``extract.output_dir`` unless set), score (shown when
``model.reconstructor`` is set) from the explanation files in ``score.input_dir``. A chunk counts as done when its
file has a final name (one directory listing per shard); the next run also validates each file.
"""
from __future__ import annotations

from pipeline.io.activations import count_rows
from pipeline.driver import Unit
from pipeline.io.layout import TMP_MARK, StageDir
from pipeline.io.shards import plan_chunks, resolve_shards


def stage_status(out: StageDir, units: list[Unit]) -> dict:
    shards = sorted({u.shard for u in units})
    listing = out.listing(shards)
    done = [u for u in units if out.chunk_name(u.index) in listing[u.shard]]
    return {
        "dir": str(out.root),
        "chunks_done": len(done), "chunks": len(units),
        "rows_done": sum(u.num_rows for u in done), "rows": sum(u.num_rows for u in units),
        "shards_complete": sum(out.shard_complete(s) for s in shards), "shards": len(shards),
        "stray_tmp": len(list(out.root.glob(f"**/.*{TMP_MARK}*"))) if out.root.exists() else 0,
    }


def collect_status(cfg) -> dict[str, dict]:
    from pipeline.stages.verbalize import activation_units

    chunks = plan_chunks(resolve_shards(cfg.data), cfg.data.chunk_rows)
    extract_units = [Unit(c.shard.name, c.index, c.num_rows, c) for c in chunks]
    verbalize_units = activation_units(StageDir(cfg.verbalize_input_dir, ".arrow", count_rows))
    status = {
        "extract": stage_status(StageDir(cfg.extract.output_dir, ".arrow"), extract_units),
        "verbalize": stage_status(StageDir(cfg.verbalize.output_dir, ".parquet"), verbalize_units)
                     | {"input_dir": cfg.verbalize_input_dir},
    }
    if cfg.model.reconstructor or cfg.score.input_dir:
        from pipeline.stages.score import explanation_units

        score_units = explanation_units(StageDir(cfg.score_input_dir, ".parquet"))
        status["score"] = stage_status(StageDir(cfg.score.output_dir, ".parquet"), score_units) | {
            "input_dir": cfg.score_input_dir}
    return status


def print_status(cfg) -> None:
    for stage, s in collect_status(cfg).items():
        line = (f"{stage:<10} {s['dir']}  {s['chunks_done']}/{s['chunks']} chunks done "
                f"({s['chunks'] - s['chunks_done']} pending), {s['rows_done']}/{s['rows']} rows, "
                f"{s['shards_complete']}/{s['shards']} shards complete")
        if stage != "extract" and not s["chunks"]:
            line += f" (no {'activation' if stage == 'verbalize' else 'explanation'} files yet in {s['input_dir']})"
        if s["stray_tmp"]:
            line += f", {s['stray_tmp']} temporary file(s) from an interrupted run (removed by a later run)"
        print(line)
