"""Remote inputs: ``data.paths`` entries that are fsspec URLs (hf://, s3://, gs://, https://, file://).

    from pipeline.io.remote import is_url, expand_url, describe, open_parquet, reading
    urls = expand_url("file:///data/prompts/*.parquet", timeout_s=60)   # sorted, protocol kept
    pf, size, etag, footer = describe(url, timeout_s=60)   # footer: "" when the server gave an ETag
    pf = open_parquet(url, version, timeout_s=60)          # cached; refused if the file's version moved
    with reading(url, timeout_s=60):                       # any fsspec/aiohttp/OS failure -> one PipelineError
        pf.read_row_group(0)

A remote file is read the way a local one is, a row group at a time, through a seekable fsspec file,
so memory stays bounded. Every failure (a 404, a 401/403, a server that stops answering, a file that
is not Parquet) becomes one PipelineError naming the URL: the CLI prints it as one line.
fsspec and aiohttp are imported only when a URL is used, so local runs never pay for them.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError


def is_url(path: str) -> bool:
    """``scheme://...`` with a scheme of two letters or more (so ``C://`` is never one)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def url_stem(url: str) -> str:
    """The last path segment of a URL without its suffix (no query string): names the output directory."""
    name = os.path.basename(urlsplit(url).path.rstrip("/"))
    return name.rsplit(".", 1)[0] if "." in name else name


def _is_http(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def _filesystem(url: str, timeout_s: float):
    """(fsspec filesystem, path within it). HTTP gets data.remote_timeout_s as its connect and
    between-bytes limits; a whole-request limit would fail a big row group on a slow link."""
    import fsspec.core

    options = {}
    if _is_http(url):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, connect=timeout_s,
                                                                     sock_connect=timeout_s, sock_read=timeout_s)}
    return fsspec.core.url_to_fs(url, **options)


def _has_glob(url: str) -> bool:
    """HTTP URLs may carry a query (``?download=true``), so there only ``*`` and ``[`` are patterns."""
    chars = "*[" if _is_http(url) else "*?["
    return any(c in url.partition("://")[2] for c in chars)


def expand_url(pattern: str, timeout_s: float) -> list[str]:
    """A URL as given, or a glob's matches, sorted (as local globs are), each a full URL again."""
    if not _has_glob(pattern):
        return [pattern]
    with reading(pattern, timeout_s):
        fs, path = _filesystem(pattern, timeout_s)
        try:
            matches = sorted(fs.glob(path))
        except NotImplementedError as e:
            raise PipelineError(f"data.paths: {pattern}: this filesystem cannot list files, so a glob cannot "
                                "be expanded; list the URLs one by one") from e
    if not matches:
        raise PipelineError(f"data.paths: {pattern!r} matched no files")
    return [m if is_url(m) else fs.unstrip_protocol(m) for m in matches]


def footer_sha256(f) -> str:
    """Hash of a Parquet footer, from an open binary file: a file ends with the footer, its 4-byte
    length and b"PAR1". The footer holds every row group's size, offsets and column statistics, so
    rewritten content changes it, and reading it costs one small read whatever the file's size."""
    f.seek(-8, os.SEEK_END)
    length = int.from_bytes(f.read(8)[:4], "little")
    f.seek(-8 - length, os.SEEK_END)
    return hashlib.sha256(f.read(length)).hexdigest()[:16]


def _etag(info: dict) -> str:
    """The ETag the filesystem reports (HTTP and S3 spell it ETag, GCS etag), without its quotes."""
    value = next((v for k, v in info.items() if k.lower() == "etag" and v), "")
    return str(value).strip('"')


def describe(url: str, timeout_s: float) -> tuple[pq.ParquetFile, int, str, str]:
    """(the open Parquet file, its size, its ETag, its footer hash): the file's identity. The footer
    is hashed only when there is no ETag (that one small read is then what tells versions apart)."""
    with reading(url, timeout_s):
        fs, path = _filesystem(url, timeout_s)
        info = fs.info(path)
        size, etag = int(info.get("size") or 0), _etag(info)
        # HTTP would ask for the size again; other filesystems' files may not take the argument.
        f = fs.open(path, "rb", **({"size": size} if size and _is_http(url) else {}))
        pf = pq.ParquetFile(f)
        return pf, size or f.size, etag, "" if etag else footer_sha256(f)


@functools.lru_cache(maxsize=4)
def open_parquet(url: str, version: str, timeout_s: float) -> pq.ParquetFile:
    """The Parquet file at ``url``, kept open: each record batch then costs its own ranged reads, not
    a new connection and footer. ``version`` is the ETag or footer hash the plan recorded; a file
    whose version has moved since (rewritten mid-run) is refused rather than mixed into the output.
    The planning process described this URL already; describing it again here costs one info request
    and one footer read per file and process, and it is what sees a rewrite between planning and reading."""
    pf, _, etag, footer = describe(url, timeout_s)
    now = etag or footer
    if version and now != version:
        raise PipelineError(f"{url}: changed since the run was planned (version {version} -> {now}); "
                            "the chunks done so far came from the old one: run again with --overwrite to start clean")
    return pf


@contextlib.contextmanager
def reading(path: str, timeout_s: float):
    """Around any remote call: its failure becomes one PipelineError that names the URL and what to
    do. For a local path this does nothing (local errors keep their own messages)."""
    if not is_url(path):
        yield
        return
    try:
        yield
    except PipelineError:
        raise
    except Exception as e:  # classified below; anything unrecognised is re-raised as it was
        message = _explain(e, timeout_s)
        if message is None:
            raise
        raise PipelineError(f"{path}: {message}") from e


def _explain(e: BaseException, timeout_s: float) -> str | None:
    """What went wrong, from the innermost cause that says: fsspec's HTTP info turns every failure
    (a 401, a timeout) into a FileNotFoundError raised from the real one."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    return next((m for m in map(lambda x: _explain_one(x, timeout_s), reversed(chain)) if m), None)


def _explain_one(e: BaseException, timeout_s: float) -> str | None:
    status = getattr(e, "status", None) if type(e).__module__.startswith("aiohttp") else None
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) or type(e).__name__ == "FSTimeoutError":
        return (f"no answer within {timeout_s:g} s (data.remote_timeout_s); check the server, or raise "
                "data.remote_timeout_s")
    if isinstance(e, FileNotFoundError) or status == 404:
        return "not found; check the URL"
    if isinstance(e, PermissionError) or status in (401, 403):
        code = f"HTTP {status}" if status else "permission denied"
        return (f"access denied ({code}); set the credentials this filesystem reads (HF_TOKEN for hf://, "
                "AWS_* or ~/.aws for s3://, gcloud for gs://) or check the URL")
    if status is not None:
        return f"HTTP {status} {getattr(e, 'message', '')}".rstrip()
    if isinstance(e, pa.ArrowInvalid):
        return f"not a readable Parquet file ({_first_line(e)})"
    if isinstance(e, (OSError, ValueError)) or type(e).__module__.startswith("aiohttp"):
        return f"cannot read ({type(e).__name__}: {_first_line(e)})"
    if isinstance(e, ImportError):
        return f"no filesystem for this URL ({_first_line(e)}); install it (s3fs for s3://, gcsfs for gs://)"
    return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
