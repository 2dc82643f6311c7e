"""``nla-pipeline status``: per stage, the chunks done and pending and the rows done. Loads no model.

    nla-pipeline status --config configs/tiny.yaml

    extract    outputs/tiny/extract     3/3 chunks, 36/36 rows, 1/1 shards complete
    verbalize  outputs/tiny/verbalize   1/3 chunks, 16/36 rows, 0/1 shards complete
"""
from __future__ import annotations

from pipeline.layout import StageDir
from pipeline.shards import plan_chunks, resolve_shards


def stage_status(out: StageDir, chunks) -> dict:
    done = [c for c in chunks if out.chunk_done(c.shard.name, c.index)]
    shards = {c.shard.name for c in chunks}
    return {
        "dir": str(out.root),
        "chunks_done": len(done), "chunks": len(chunks),
        "rows_done": sum(c.num_rows for c in done), "rows": sum(c.num_rows for c in chunks),
        "shards_complete": sum(out.shard_complete(s) for s in shards), "shards": len(shards),
        "stray_tmp": len(list(out.root.glob("**/.*.tmp-*"))) if out.root.exists() else 0,
    }


def collect_status(cfg) -> dict[str, dict]:
    chunks = plan_chunks(resolve_shards(cfg.data), cfg.data.chunk_rows)
    return {
        "extract": stage_status(StageDir(cfg.extract.output_dir, ".arrow"), chunks),
        "verbalize": stage_status(StageDir(cfg.verbalize.output_dir, ".parquet"), chunks),
    }


def print_status(cfg) -> None:
    for stage, s in collect_status(cfg).items():
        line = (f"{stage:<10} {s['dir']}  {s['chunks_done']}/{s['chunks']} chunks done "
                f"({s['chunks'] - s['chunks_done']} pending), {s['rows_done']}/{s['rows']} rows, "
                f"{s['shards_complete']}/{s['shards']} shards complete")
        if s["stray_tmp"]:
            line += f", {s['stray_tmp']} temporary file(s) from an interrupted run (removed on the next run)"
        print(line)
