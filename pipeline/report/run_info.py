"""What a report says about the run itself: per stage its settings, progress, dates and throughput.

    from pipeline.report.run_info import run_info
    info = run_info(cfg)
    info["stages"]["verbalize"]["status"]      # chunks done / pending, rows (pipeline.status)
    info["stages"]["extract"]["ranks"]         # {rank: {rows, seconds, tokens, ...}} from logs/*.timing.jsonl
    info["missing"]                            # sentences: what a partial run lacks

Reads only small files: each stage's ``_fingerprint.json``, ``_config.yaml``, ``_summary.json``, one
chunk file's metadata, the per-rank logs (streamed, a few lines kept) and the timing files.
"""
from __future__ import annotations

import json
import logging
import re
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.errors import PipelineError
from pipeline.io.layout import FINGERPRINT, StageDir
from pipeline.io.timing import read_timing

log = logging.getLogger(__name__)

SUFFIX = {"extract": ".arrow", "verbalize": ".parquet", "score": ".parquet"}
# What each stage counts as its tokens in its per-chunk stats (pipeline.io.timing).
TOKENS = {"extract": ("tokens", "prompt tokens/s"), "verbalize": ("generated_tokens", "generated tokens/s"),
          "score": ("tokens", "reconstructor tokens/s")}
_WROTE = re.compile(r"(\w+): rank (\d+) wrote (\d+) row\(s\) in (\d+) chunk\(s\) in ([\d.]+)s")
_LEVEL = re.compile(r"\[rank (\d+)\] (WARNING|ERROR|CRITICAL) ([\w.]+): (.*)")
KEEP_LOG_LINES = 8


def stage_dirs(cfg) -> dict[str, str]:
    """Where each stage's outputs are (score only when the run has one or its directory exists)."""
    dirs = {"extract": cfg.extract.output_dir, "verbalize": cfg.verbalize.output_dir}
    if cfg.model.reconstructor or Path(cfg.score.output_dir).exists():
        dirs["score"] = cfg.score.output_dir
    return dirs


def _when(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def file_metadata(path: Path) -> dict[str, str]:
    """A chunk file's schema metadata (Arrow IPC header or Parquet footer), {} if unreadable."""
    try:
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as src:
                meta = pa.ipc.open_stream(src).schema.metadata or {}
        else:
            meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:")}


def read_logs(logs_dir: Path) -> dict:
    """Warnings and errors per rank (the last few kept), and each rank's own 'wrote N row(s) in S s'
    lines: the throughput of a run older than the timing files."""
    out = {"warnings": 0, "errors": 0, "last": deque(maxlen=KEEP_LOG_LINES), "wrote": {}, "files": []}
    for path in sorted(Path(logs_dir).glob("rank*.log")):
        out["files"].append(path.name)
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _LEVEL.search(line)
                if m:
                    out["errors" if m.group(2) != "WARNING" else "warnings"] += 1
                    out["last"].append(f"rank {m.group(1)} {m.group(2)}: {m.group(4).strip()}")
                w = _WROTE.search(line)
                if w:
                    rank = out["wrote"].setdefault(int(w.group(2)), {"rows": 0, "chunks": 0, "seconds": 0.0})
                    rank["rows"] += int(w.group(3))
                    rank["chunks"] += int(w.group(4))
                    rank["seconds"] += float(w.group(5))
    out["last"] = list(out["last"])
    return out


def _stage(name: str, root: str, status: dict | None) -> dict:
    out = StageDir(root, SUFFIX[name])
    files = out.chunk_files()
    fp = _read_json(out.root / FINGERPRINT) or {}
    config_path = out.root / "_config.yaml"
    info = {"name": name, "dir": str(out.root), "exists": out.root.is_dir(), "files": len(files),
            "fingerprint": fp.get("fingerprint"), "settings": fp.get("settings", {}),
            "config": config_path.read_text(encoding="utf-8") if config_path.exists() else None,
            "status": status, "metadata": file_metadata(files[0]) if files else {},
            "summary": _read_json(out.root / "_summary.json") if name == "score" else None}
    mtimes = [f.stat().st_mtime for f in files]
    info["first_write"], info["last_write"] = (_when(min(mtimes)), _when(max(mtimes))) if mtimes else (None, None)
    ranks, wall, span = read_timing(out.root / "logs")
    key, label = TOKENS[name]
    for r in ranks.values():
        r["rows_per_s"] = r["rows"] / r["seconds"] if r.get("seconds") else None
        r["tokens_per_s"] = r.get(key, 0) / r["seconds"] if r.get("seconds") else None
    info.update(ranks=ranks, wall_seconds=wall if ranks else None, tokens_label=label,
                started=_when(span[0]) if span else None, ended=_when(span[1]) if span else None,
                logs=read_logs(out.root / "logs"))
    return info


def _status(cfg) -> tuple[dict, str | None]:
    from pipeline.status import collect_status

    try:
        return collect_status(cfg), None
    except PipelineError as e:  # inputs moved, say: the report still shows what is on disk
        return {}, f"chunks pending are unknown: {e}"


def run_info(cfg) -> dict:
    """Every stage's settings, status, dates and per-rank throughput, and what is missing."""
    from pipeline import __version__

    status, problem = _status(cfg)
    stages = {name: _stage(name, root, status.get(name)) for name, root in stage_dirs(cfg).items()}
    missing = [problem] if problem else []
    for name, s in stages.items():
        st = s["status"]
        if not s["files"]:
            missing.append(f"{name}: no output in {s['dir']} yet (run nla-pipeline {name})")
        elif st and st["chunks_done"] < st["chunks"]:
            missing.append(f"{name}: {st['chunks'] - st['chunks_done']} of {st['chunks']} chunk(s) pending "
                           f"({st['rows'] - st['rows_done']} row(s)); rerun nla-pipeline {name} to finish")
        if s["files"] and not s["ranks"]:
            missing.append(f"{name}: no timing records in {s['dir']}/logs (a run older than them); "
                           "throughput comes from the text logs")
    if "score" in stages and stages["score"]["files"] and not stages["score"]["summary"]:
        missing.append("score: no _summary.json yet (written once every chunk is scored)")
    if "score" not in stages:
        missing.append("score: not part of this run (model.reconstructor is not set), so no FVE")
    latest = next((s for s in reversed(stages.values()) if s["config"]), None)
    config = yaml.safe_load(latest["config"]) if latest else cfg.to_dict()
    return {"version": __version__, "generated": _when(datetime.now(timezone.utc).timestamp()),
            "config": config, "config_from": f"{latest['dir']}/_config.yaml" if latest else "the report's config",
            "stages": stages, "missing": missing}
