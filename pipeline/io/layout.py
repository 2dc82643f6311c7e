"""Output side: where a stage's files live, how they land atomically and durably, and what counts as done.

    <output_dir>/
      _fingerprint.json               settings that change outputs; a resume must match them
      _config.yaml                    the resolved config of the last run
      logs/rank00000.log              one log per rank
      logs/rank00000.timing.jsonl     one JSON line per chunk that rank wrote (pipeline.io.timing)
      00000-<stem>/chunk_00000.arrow  one file per chunk (extract: Arrow IPC; verbalize: Parquet)
      00000-<stem>/_COMPLETE          written last, once every chunk of the shard exists

    from pipeline.io.layout import StageDir
    out = StageDir(cfg.extract.output_dir, suffix=".arrow", count_rows=count_rows)
    names = out.listing(["00000-train"])["00000-train"]     # one directory read, not a stat per chunk
    out.chunk_problem("00000-train", 3, expected_rows=256)  # None, or why the file cannot be trusted
    out.write_chunk(out.chunk_path("00000-train", 3), lambda tmp: write_table(tmp))
    with out.background_writes():     # the driver's loop: chunk files are written in a writer thread
        ...

A file gets a final name only by ``os.replace`` of a complete, fsynced temporary file, and the
directory is fsynced after the rename, so a final name survives a node crash with its bytes. A
resume still validates each final file it would skip (it opens, its header or footer reads, its row
count matches the plan), since a write-back filesystem can lose data a crash-free machine kept.
Temporary names start with "." and never match a chunk glob; they carry host, pid and a random
suffix, because containers on different nodes often share pids.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import yaml

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FINGERPRINT = "_fingerprint.json"
PROTOCOL = "_protocol.json"  # each protocol value and its source (config, nla_meta.yaml, default)
COMPLETE = "_COMPLETE"
TMP_MARK = ".tmp-"
SHARD_DIR = re.compile(r"^\d{5}-")
# A temporary file that is not one of this run's own chunks (a marker's, the fingerprint's) is
# removed only once it is this much older than the fingerprint file this run just wrote: both
# mtimes come from the file server's clock, so clock skew between nodes cannot make a live
# temporary file of a concurrent job look stale.
STALE_TMP_SECONDS = 3600


def temp_path(final: Path) -> Path:
    host = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())[:40]
    return final.parent / f".{final.name}{TMP_MARK}{host}-{os.getpid()}-{secrets.token_hex(4)}"


def temp_target(name: str) -> str | None:
    """The final name a temporary file was meant for (``.chunk_00003.arrow.tmp-h-1-ab`` ->
    ``chunk_00003.arrow``), or None for any other name."""
    if not name.startswith(".") or TMP_MARK not in name:
        return None
    return name[1:].split(TMP_MARK, 1)[0]


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StageDir:
    """``count_rows(path) -> int`` reads a chunk file's row count cheaply (header or footer) and
    raises on a file it cannot read; it is what ``chunk_problem`` validates with."""

    def __init__(self, root: str | os.PathLike, suffix: str, count_rows: Callable[[Path], int] | None = None):
        self.root = Path(root)
        self.suffix = suffix
        self.count_rows = count_rows
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None

    def shard_dir(self, shard_name: str) -> Path:
        return self.root / shard_name

    def chunk_name(self, chunk_index: int) -> str:
        return f"chunk_{chunk_index:05d}{self.suffix}"

    def chunk_path(self, shard_name: str, chunk_index: int) -> Path:
        return self.root / shard_name / self.chunk_name(chunk_index)

    def chunk_done(self, shard_name: str, chunk_index: int) -> bool:
        return self.chunk_path(shard_name, chunk_index).exists()

    def chunk_files(self) -> list[Path]:
        """Every finished chunk file, in input order (shard index, then chunk index)."""
        return sorted(self.root.glob(f"[0-9]*-*/chunk_*{self.suffix}"))

    def listing(self, shard_names: Iterable[str]) -> dict[str, set[str]]:
        """The entry names of each shard directory: one directory read per shard, however many
        chunks it has (a stat per chunk is what made progress and resume checks quadratic)."""
        names = {}
        for shard in shard_names:
            try:
                with os.scandir(self.shard_dir(shard)) as it:
                    names[shard] = {e.name for e in it}
            except FileNotFoundError:
                names[shard] = set()
        return names

    def chunk_problem(self, shard_name: str, chunk_index: int, expected_rows: int) -> str | None:
        """Why a final-named chunk file cannot count as done (None if it can): empty, unreadable,
        or another row count than the plan's."""
        path = self.chunk_path(shard_name, chunk_index)
        try:
            if path.stat().st_size == 0:
                return "the file is empty (0 bytes)"
            if self.count_rows is None:
                return None
            rows = self.count_rows(path)
        except FileNotFoundError:
            return "the file is missing"
        except Exception as e:  # noqa: BLE001 - any reader error means the same: redo the chunk
            return f"the file cannot be read ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        return None if rows == expected_rows else f"the file holds {rows} row(s), the plan {expected_rows}"

    def log_path(self, rank: int) -> Path:
        return self.root / "logs" / f"rank{rank:05d}.log"

    def timing_path(self, rank: int) -> Path:
        """One JSON line per chunk this rank wrote (pipeline.io.timing), read by ``nla-pipeline report``."""
        return self.root / "logs" / f"rank{rank:05d}.timing.jsonl"

    @staticmethod
    def write_atomic(final: Path, write: Callable[[Path], None]) -> None:
        """Write through a temporary name in the same directory, fsync it, rename it into place and
        fsync the directory, so that neither a kill nor a node crash leaves a partial final file."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(final)
        try:
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, final)
            _fsync(final.parent, directory=True)
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
        self.flush()
        self._inflight = self._writer.submit(self.write_atomic, final, write)

    def flush(self) -> None:
        """Wait until the write in flight (if any) has landed; re-raise its error."""
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
        self.flush()  # only without an exception from the body: a failed write is reported here

    # --- shard markers --------------------------------------------------------------------------

    def mark_complete(self, shard_name: str, info: dict) -> None:
        """Write the shard's marker once all its chunks exist. Ranks racing here write identical bytes."""
        path = self.shard_dir(shard_name) / COMPLETE
        if path.exists():
            return
        self.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(info, sort_keys=True, indent=1)))

    def shard_complete(self, shard_name: str) -> bool:
        return (self.shard_dir(shard_name) / COMPLETE).exists()

    def shard_marker(self, shard_name: str) -> dict | None:
        """The marker's content ({"chunks": n, "rows": r}), or None while the shard is incomplete."""
        try:
            return json.loads((self.shard_dir(shard_name) / COMPLETE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def unmark(self, shard_name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.shard_dir(shard_name) / COMPLETE).unlink()

    # --- temporary files ------------------------------------------------------------------------

    def remove_temps(self, shard_name: str, names: Iterable[str], targets: set[str]) -> int:
        """Remove the temporary files among ``names`` (a listing of the shard) meant for ``targets``:
        a rank calls this for its own chunks, which no other rank of the job ever writes."""
        removed = 0
        for name in names:
            if temp_target(name) in targets:
                with contextlib.suppress(FileNotFoundError):
                    (self.shard_dir(shard_name) / name).unlink()
                    removed += 1
        return removed

    def clean_stale_tmp(self) -> int:
        """Remove temporary files more than STALE_TMP_SECONDS older than the fingerprint file (which
        rank 0 has just written, so its mtime is the file server's 'now')."""
        try:
            now = (self.root / FINGERPRINT).stat().st_mtime
        except FileNotFoundError:
            return 0
        removed = 0
        for tmp in self.root.glob(f"**/.*{TMP_MARK}*"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.is_file() and tmp.stat().st_mtime < now - STALE_TMP_SECONDS:
                    tmp.unlink()
                    removed += 1
        return removed

    # --- fingerprint and --overwrite ------------------------------------------------------------

    def owner(self) -> str | None:
        """The stage named by this directory's fingerprint file, if there is one."""
        try:
            return json.loads((self.root / FINGERPRINT).read_text(encoding="utf-8")).get("settings", {}).get("stage")
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            return None

    def check_fingerprint(self, fp: str, settings: dict) -> None:
        """Refuse to resume into a directory written with other settings; say which ones differ."""
        path = self.root / FINGERPRINT
        if not path.exists():
            return
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            return
        diff = _differences(old.get("settings", {}), settings)
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:4])
        raise PipelineError(
            f"{self.root} was written with other settings or inputs ({shown}); "
            "use another output directory, or pass --overwrite to start clean"
        )

    def write_fingerprint(self, fp: str, settings: dict, config: dict) -> None:
        payload = json.dumps({"fingerprint": fp, "settings": settings}, sort_keys=True, indent=1, ensure_ascii=False)
        self.write_atomic(self.root / FINGERPRINT, lambda tmp: tmp.write_text(payload, encoding="utf-8"))
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        self.write_atomic(self.root / "_config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def wipe(self, stage: str, key: str) -> None:
        """``--overwrite``: delete what ``stage`` wrote here, and nothing else.

        Refused unless the directory is empty (but for this run's own ``logs/``) or its fingerprint
        file names ``stage``: an output directory pointed by mistake at the inputs, at ``.``, or at
        the other stage's output must not be emptied. Deleted: the shard directories' chunk files,
        markers and temporary files (a shard directory is removed once empty), the ``_*`` files, the
        temporary files at the top, ``logs/rank*.log`` and ``logs/rank*.timing.jsonl``. Anything else
        stays where it is."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise PipelineError(f"{key}={self.root} is not a directory")
        others = sorted(p.name for p in self.root.iterdir() if p.name != "logs")
        owner = self.owner()
        if others and owner != stage:
            what = (f"holds {owner} output, not {stage} output" if owner else
                    f"is not empty (e.g. {others[0]!r}) and has no {FINGERPRINT} of stage {stage!r}")
            raise PipelineError(f"--overwrite refused: {key}={self.root} {what}; point {key} at a new or "
                                "empty directory, or delete it yourself")
        kept = []
        for entry in self.root.iterdir():
            if entry.is_dir() and SHARD_DIR.match(entry.name):
                for f in entry.iterdir():
                    if f.is_file() and (f.name == COMPLETE or temp_target(f.name) is not None
                                        or (f.name.startswith("chunk_") and f.name.endswith(self.suffix))):
                        f.unlink()
                with contextlib.suppress(OSError):
                    entry.rmdir()
                if entry.exists():
                    kept.append(entry.name)
            elif entry.is_file() and (entry.name.startswith("_") or temp_target(entry.name) is not None):
                entry.unlink()
        logs = self.root / "logs"
        if logs.is_dir():
            for f in [*logs.glob("rank*.log"), *logs.glob("rank*.timing.jsonl")]:
                f.unlink()
            with contextlib.suppress(OSError):
                logs.rmdir()
        if kept:
            log.warning("--overwrite: kept %d shard director(ies) under %s that hold files this stage did not "
                        "write (e.g. %s)", len(kept), self.root, kept[0])


def _differences(before: dict, now: dict, name: str = "") -> list[tuple[str, object, object]]:
    """(key, old, new) of each setting that differs. Mappings on both sides are compared key by
    key, so a rewritten input file reads ``data.files[/data/a.parquet].size: 1024 -> 2048``."""
    diff = []
    for k in sorted(set(before) | set(now)):
        a, b = before.get(k), now.get(k)
        # A mapping setting's keys may be paths (data.files), hence brackets one level down.
        key = k if not name else (f"{name}[{k}]" if "[" not in name else f"{name}.{k}")
        if isinstance(a, dict) and isinstance(b, dict):
            diff += _differences(a, b, key)
        elif a != b:
            diff.append((key, a, b))
    return diff
