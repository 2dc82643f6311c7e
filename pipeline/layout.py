"""Output side: where a stage's files live, how they land atomically, and what counts as done.

    <output_dir>/
      _fingerprint.json               settings that change outputs; a resume must match them
      _config.yaml                    the resolved config of the last run
      logs/rank00000.log              one log per rank
      00000-<stem>/chunk_00000.arrow  one file per chunk (extract: Arrow IPC; verbalize: Parquet)
      00000-<stem>/_COMPLETE          written last, once every chunk of the shard exists

    from pipeline.layout import StageDir
    out = StageDir(cfg.extract.output_dir, suffix=".arrow")
    if not out.chunk_done(chunk):
        out.write_chunk(out.chunk_path(chunk), lambda tmp: write_table(tmp))
    with out.background_writes():     # the driver's loop: chunk files are written in a writer thread
        ...

A chunk is done exactly when its final file exists: files only ever get a final name by os.replace
of a complete temporary file. Temporary names start with "." and so never match a chunk glob.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import yaml

from pipeline.errors import PipelineError

FINGERPRINT = "_fingerprint.json"
COMPLETE = "_COMPLETE"
_START = time.time()


class StageDir:
    def __init__(self, root: str | os.PathLike, suffix: str):
        self.root = Path(root)
        self.suffix = suffix
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None

    def shard_dir(self, shard_name: str) -> Path:
        return self.root / shard_name

    def chunk_path(self, shard_name: str, chunk_index: int) -> Path:
        return self.root / shard_name / f"chunk_{chunk_index:05d}{self.suffix}"

    def chunk_done(self, shard_name: str, chunk_index: int) -> bool:
        return self.chunk_path(shard_name, chunk_index).exists()

    def chunk_files(self) -> list[Path]:
        """Every finished chunk file, in input order (shard index, then chunk index)."""
        return sorted(self.root.glob(f"[0-9]*-*/chunk_*{self.suffix}"))

    def log_path(self, rank: int) -> Path:
        return self.root / "logs" / f"rank{rank:05d}.log"

    @staticmethod
    def write_atomic(final: Path, write: Callable[[Path], None]) -> None:
        """Write through a temporary name in the same directory, then rename into place."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()

    def write_chunk(self, final: Path, write: Callable[[Path], None]) -> None:
        """write_atomic for a chunk file; inside ``background_writes()`` it runs in the writer thread
        while the caller goes on computing. One write at a time: a second call first waits for the
        first (memory stays bounded) and re-raises its error, if any."""
        if self._writer is None:
            self.write_atomic(final, write)
            return
        self._wait()
        self._inflight = self._writer.submit(self.write_atomic, final, write)

    def _wait(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    @contextlib.contextmanager
    def background_writes(self):
        """Chunk writes overlap compute: the GPU need not wait on a slow (network) filesystem. On
        leaving, the last write has landed; if the body raised, a write already started still lands."""
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        try:
            yield self
        finally:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._wait()  # only without an exception from the body: a failed write is reported here

    def mark_complete(self, shard_name: str, info: dict) -> None:
        """Write the shard's marker once all its chunks exist. Ranks racing here write identical bytes."""
        path = self.shard_dir(shard_name) / COMPLETE
        if path.exists():
            return
        self.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(info, sort_keys=True, indent=1)))

    def shard_complete(self, shard_name: str) -> bool:
        return (self.shard_dir(shard_name) / COMPLETE).exists()

    def clean_stale_tmp(self) -> int:
        """Remove temporary files left by killed runs (older than this process), never live ones."""
        removed = 0
        for tmp in self.root.glob("**/.*.tmp-*"):
            try:
                if tmp.stat().st_mtime < _START:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def check_fingerprint(self, fp: str, settings: dict) -> None:
        """Refuse to resume into a directory written with other settings; say which ones differ."""
        path = self.root / FINGERPRINT
        if not path.exists():
            return
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            return
        before, now = old.get("settings", {}), settings
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise PipelineError(
            f"{self.root} was written with other settings ({shown}); "
            "use another output directory, or pass --overwrite to start clean"
        )

    def write_fingerprint(self, fp: str, settings: dict, config: dict) -> None:
        payload = json.dumps({"fingerprint": fp, "settings": settings}, sort_keys=True, indent=1, ensure_ascii=False)
        self.write_atomic(self.root / FINGERPRINT, lambda tmp: tmp.write_text(payload, encoding="utf-8"))
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        self.write_atomic(self.root / "_config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def wipe(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
