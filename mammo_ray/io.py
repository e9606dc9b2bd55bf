"""Paths that may be local folders or object-store URIs (``s3://``, ``gs://``) via ``pyarrow.fs``."""
from __future__ import annotations

import functools
import os
import posixpath
import stat
from typing import TypeVar
from collections.abc import Callable, Iterator

import pyarrow.fs as pafs

from mammo_ray import stores

T = TypeVar("T")


def is_uri(path: str) -> bool:
    """True for an object-store (or ``file://``) URI rather than a plain local path.

    Raises:
        ValueError: a ``name://`` path whose scheme is not supported (naming the supported ones).
    """
    return stores.scheme_of(str(path)) is not None


@functools.lru_cache(maxsize=32)
def _filesystem_for(prefix: str, _env: tuple) -> pafs.FileSystem:
    return stores.build(prefix)


def _env_key() -> tuple:
    # a cached filesystem is only reused while the endpoint, credentials and timeouts it was
    # built from are unchanged (Arrow reads them from the environment when it is created)
    return tuple(os.environ.get(k) for k in stores.STORE_ENVS)


def on_store(path: str, fs: pafs.FileSystem, fn: Callable[[], T]) -> T:
    """Run ``fn`` (an operation on ``fs``): local as it is; on a store, a failure becomes one
    line naming ``path``, and GCS calls run under the store deadline (:mod:`mammo_ray.stores`)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fn()
    return stores.call(path, fn, bounded=stores.is_gcs(fs))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or a URI.

    S3 endpoints and credentials come from the usual environment variables
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...), read by Arrow's S3 client; stores are
    built with timeouts and bounded retries (:mod:`mammo_ray.stores`).

    Raises:
        ValueError: a scheme that is not supported.
        RemoteStoreError: a store that does not answer while it is set up (one line).
    """
    path = str(path)
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        if scheme == "file":
            return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
        bucket = rest.split("/", 1)[0]
        fs = _filesystem_for(f"{scheme}://{bucket}", _env_key())
        return fs, rest.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts for a local path or a URI."""
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def to_uri(fs: pafs.FileSystem, inner: str, like: str) -> str:
    """Turn a path inside ``fs`` back into the user's form (URI when ``like`` is one)."""
    if is_uri(like) and not like.startswith("file://"):
        scheme = like.split("://", 1)[0]
        return f"{scheme}://{inner}"
    return inner


#: one MB in the size bound's messages and ``--max-file-mb`` (2**20 bytes)
MB = 1 << 20

_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"))


class InputRefused(OSError):
    """An input that is not read at all: not a regular file, or over the size bound. Its
    message is the whole ``errors.csv`` reason."""


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ("FIFO", "character device"...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "special file")


def check_input(mode: int, size: int, max_bytes: int) -> None:
    """Raise :class:`InputRefused` unless ``mode`` is a regular file of at most ``max_bytes``."""
    kind = file_kind(mode)
    if kind:
        raise InputRefused(f"not a regular file ({kind})")
    if size > max_bytes:
        raise InputRefused(f"file is {size / MB:.1f} MB, over the {max_bytes / MB:g} MB bound (--max-file-mb)")


def read_input(path: str, max_bytes: int, *, head: int | None = None) -> bytes:
    """Read one input file (local or URI) of at most ``max_bytes``, never more memory than that.

    Local files are checked before opening (``stat`` after resolving links: a FIFO would block
    ``open``), opened non-blocking, checked again on the open descriptor (``fstat``: the file may
    have changed since it was listed) and read up to ``max_bytes + 1`` bytes, so a link to
    ``/dev/zero`` or a file that grows cannot make the read run on.

    Args:
        head: read only the first ``head`` bytes (a header probe); the size bound is then not
            applied, the regular-file check is.

    Raises:
        InputRefused: not a regular file, or larger than ``max_bytes``.
        OSError: the file cannot be opened or read.
    """
    limit = max_bytes if head is None else head
    bound = max_bytes if head is None else float("inf")
    if is_uri(path) and not str(path).startswith("file://"):
        fs, inner = resolve(path)
        f = on_store(path, fs, lambda: fs.open_input_file(inner))
        try:
            check_input(stat.S_IFREG, on_store(path, fs, f.size), bound)
            data = on_store(path, fs, lambda: f.read(limit + 1))
        finally:
            f.close()
    else:
        local = resolve(path)[1]
        st = os.stat(local)
        check_input(st.st_mode, st.st_size, bound)
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            check_input(st.st_mode, st.st_size, bound)
            data = f.read(limit + 1)
    if head is not None:
        return data[:head]
    if len(data) > max_bytes:  # grew after the check
        raise InputRefused(f"file is over the {max_bytes / MB:g} MB bound (--max-file-mb) (it grew while read)")
    return data


def read_bytes(path: str) -> bytes:
    """Read a whole file (local or URI)."""
    fs, inner = resolve(path)

    def get() -> bytes:
        with fs.open_input_stream(inner) as f:
            return f.read()

    return on_store(path, fs, get)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file (local or URI), creating parent folders; local writes are atomic."""
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner) if is_uri(path) else os.path.dirname(inner)
    on_store(path, fs, lambda: fs.create_dir(parent, recursive=True))
    if isinstance(fs, pafs.LocalFileSystem):
        # dot-prefixed: Parquet dataset readers (pyarrow, pandas, Spark) skip it if a kill leaves it
        tmp = os.path.join(parent, f".{os.path.basename(inner)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, inner)
        finally:  # a failed write (disk full...) leaves no half-written temp file behind
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return

    def put() -> None:
        with fs.open_output_stream(inner) as f:
            f.write(data)

    on_store(path, fs, put)


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    on_store(path, fs, lambda: fs.create_dir(inner, recursive=True))


def file_type(path: str) -> pafs.FileType:
    """Arrow's type of ``path`` (``NotFound`` when absent); a store's failure is one line naming it."""
    fs, inner = resolve(path)
    return on_store(path, fs, lambda: fs.get_file_info(inner)).type


def exists(path: str) -> bool:
    return file_type(path) != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return file_type(path) == pafs.FileType.Directory


def list_files(path: str, report: dict | None = None) -> Iterator[tuple[str, int]]:
    """Yield ``(path or URI, size)`` of every file under ``path``, sorted, hidden files skipped.

    Local trees are walked with ``os.walk`` so that broken symlinks and unreadable entries
    are listed too (they become error lines later, not silent gaps). Symlinked folders are
    followed (archives are often assembled from links), each real folder once.

    Args:
        report: when given, filled with what the walk did not yield: ``skipped`` (a count per
            reason: hidden file, hidden folder, folder already listed through another link)
            ``unreadable`` (``(folder, reason)`` for folders that could not be listed) and
            ``linked`` (real paths of the symlinked folders followed).
    """
    report = report if report is not None else {}
    report.setdefault("skipped", {})
    report.setdefault("unreadable", [])
    report.setdefault("linked", [])
    if not is_uri(path):
        yield from sorted(_walk_local(os.path.abspath(path), report))
        return
    fs, inner = resolve(path)
    infos = on_store(path, fs, lambda: fs.get_file_info(pafs.FileSelector(inner, recursive=True)))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(inner):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            _skip(report, "hidden file")
            continue
        yield to_uri(fs, info.path, path), int(info.size or 0)


def _skip(report: dict, reason: str, n: int = 1) -> None:
    report["skipped"][reason] = report["skipped"].get(reason, 0) + n


def _walk_local(root: str, report: dict) -> list[tuple[str, int]]:
    """(path, size) of the files under a local ``root``, following symlinked folders once each."""
    found: list[tuple[str, int]] = []
    seen: set[tuple[int, int]] = set()
    unreadable = report["unreadable"]

    def on_error(exc: OSError) -> None:
        unreadable.append((exc.filename or root, f"unreadable folder: {type(exc).__name__}: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            unreadable.append((dirpath, f"unreadable folder: {type(exc).__name__}: {exc.strerror}"))
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back into the tree (or a second link to a folder)
            _skip(report, "folder already listed through another path (symlink)")
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if dirpath != root and os.path.islink(dirpath):
            report["linked"].append(os.path.realpath(dirpath))
        hidden = [d for d in dirnames if d.startswith(".")]
        if hidden:
            _skip(report, "hidden folder", len(hidden))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                _skip(report, "hidden file")
                continue
            full = os.path.join(dirpath, name)
            try:
                size = os.stat(full).st_size
            except OSError:
                size = 0
            found.append((full, size))
    return found


def relpath(path: str, root: str) -> str:
    """``path`` relative to ``root`` with forward slashes (both local or both URIs)."""
    if is_uri(root):
        return path[len(root.rstrip("/")):].lstrip("/")
    return os.path.relpath(path, os.path.abspath(root)).replace(os.sep, "/")
