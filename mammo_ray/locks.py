"""One run per ``--out``: a lock object held for the run's whole life.

Two runs writing one folder at once both used to end "nothing lost" while the folder mixed
their rows. Every CLI stage now holds ``OUT/.mammo-ray.lock`` (JSON: host, pid, start time,
a random token, and a heartbeat refreshed every :data:`HEARTBEAT_S` seconds) from before its
output checks until it ends, also when it fails. A second run is refused in one line that
names the holder. A lock whose holder is gone is *stale* and taken over with a warning:

- same host and the pid is not alive (a killed run: its lock stays behind), or
- the heartbeat is older than :data:`TTL_S` (a holder on another host, or a hung one).

How the lock is created atomically, per store:

- **local disk**: the record written to a file of its own, then ``os.link``-ed to the lock's name,
  which fails when the name exists (atomic, like ``O_EXCL``, also on NFSv3+), so the lock never
  exists without its whole record.
  A stale lock is first renamed to a unique name (``rename`` is atomic: of two runs taking
  over the same stale lock, only one rename succeeds), then created again the same way.
- **s3://**: a conditional PUT, ``If-None-Match: *`` (S3 honours it since August 2024, as do
  MinIO and moto 5.x): the PUT fails with 412 when the object exists, so exactly one run
  creates it. The heartbeat and a takeover are PUTs with ``If-Match: <ETag>`` of the object
  read, so a takeover replaces only the stale lock it inspected. pyarrow's S3 filesystem has
  no conditional writes, hence boto3 (a dependency for this).
- **other object stores** (``gs://`` ...): no conditional write through pyarrow; a lease
  object written when absent, then read back after a short wait: the run whose token is read
  back holds it. This narrows the race to that wait but cannot close it (said in the log).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any
from collections.abc import Iterator

from mammo_ray import io as mio

logger = logging.getLogger(__name__)

LOCK = ".mammo-ray.lock"
HEARTBEAT_S = 30.0
# a lock not refreshed for this long belongs to a run that is gone (4 missed heartbeats)
TTL_S = 120.0


class OutputLockedError(ValueError):
    """Another live run holds the ``--out`` lock."""


def _record(stage: str) -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "stage": stage, "token": secrets.token_hex(16),
            "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "heartbeat": now}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(holder: dict[str, Any], *, now: float | None = None, ttl: float = TTL_S) -> bool:
    """True when the lock's holder is gone: its pid is dead on this host, or its heartbeat is old."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return True
    try:
        return now - float(holder.get("heartbeat", 0)) > ttl
    except (TypeError, ValueError):
        return True


def _describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('stage', 'a')} run on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('start', '?')}")


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


# link() on a file system that has no hard links
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class _LocalLock:
    """Create by ``link``, rename-aside takeover, atomic replace for the heartbeat."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(os.path.abspath(out), LOCK)

    def create(self, data: bytes) -> bool:
        # the record is written to a file of our own and then hard-linked into place: link()
        # fails when the lock exists (atomic, as O_EXCL is, also on NFS), and the lock appears
        # with its whole record. With O_EXCL and a write after it, a second run could read the
        # lock empty in between, take it for stale and take it over: both ran (seen in the suite)
        # (named like the other write temporaries, ``.name.tmp-<pid>``, which outputs.py skips)
        tmp = f"{self.path}.{secrets.token_hex(4)}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.link(tmp, self.path)
        except FileExistsError:
            # over NFS a lost reply to a link that was made comes back as EEXIST: then the
            # temporary has a second name, which is the lock (the open(2) man page's recipe)
            return os.stat(tmp).st_nlink == 2
        except OSError as exc:
            if exc.errno in _NO_HARD_LINKS:  # some FUSE and SMB mounts: O_EXCL instead
                return self._create_exclusive(data)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            return _parse(data), os.stat(self.path).st_ino
        except FileNotFoundError:
            return None

    def take_over(self, version: Any, data: bytes) -> bool:
        aside = f"{self.path}.stale-{secrets.token_hex(4)}"
        try:
            if os.stat(self.path).st_ino != version:
                return False
            os.rename(self.path, aside)  # only one of two runs taking over gets here
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return self.create(data)

    def refresh(self, version: Any, data: bytes) -> Any:
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return os.stat(self.path).st_ino

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _S3Lock:
    """Conditional PUTs (``If-None-Match: *`` to create, ``If-Match: <ETag>`` to refresh or
    take over) through boto3, which reads the endpoint and credentials from the same
    environment variables as pyarrow (``AWS_ENDPOINT_URL``...)."""

    def __init__(self, out: str) -> None:
        import boto3  # deferred: only runs that write to s3:// need it

        bucket, _, prefix = out[len("s3://"):].partition("/")
        self.bucket, self.key = bucket, (prefix.rstrip("/") + "/" if prefix.strip("/") else "") + LOCK
        self.client = boto3.client("s3")

    def _failed_precondition(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        # 412: the condition did not hold; 409: a concurrent conditional write won the race
        return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")

    def _put(self, data: bytes, **cond: str) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)["ETag"]
        except Exception as exc:
            if self._failed_precondition(exc):
                return None
            raise

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*") is not None

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return _parse(got["Body"].read()), got["ETag"]

    def take_over(self, version: Any, data: bytes) -> bool:
        return self._put(data, IfMatch=version) is not None

    def refresh(self, version: Any, data: bytes) -> Any:
        etag = self._put(data, IfMatch=version)
        if etag is None:
            raise OutputLockedError(f"s3://{self.bucket}/{self.key} was taken by another run")
        return etag

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _LeaseLock:
    """Other object stores through pyarrow: write when absent, read back after a pause."""

    SETTLE_S = 2.0

    def __init__(self, out: str) -> None:
        self.path = mio.join(out, LOCK)

    def create(self, data: bytes) -> bool:
        if mio.exists(self.path):
            return False
        mio.write_bytes(self.path, data)
        time.sleep(self.SETTLE_S)  # a concurrent writer's object would be read back instead of ours
        return mio.read_bytes(self.path) == data

    def read(self) -> tuple[dict[str, Any], Any] | None:
        if not mio.exists(self.path):
            return None
        data = mio.read_bytes(self.path)
        return _parse(data), data

    def take_over(self, version: Any, data: bytes) -> bool:
        if mio.read_bytes(self.path) != version:
            return False
        mio.write_bytes(self.path, data)
        time.sleep(self.SETTLE_S)
        return mio.read_bytes(self.path) == data

    def refresh(self, version: Any, data: bytes) -> Any:
        mio.write_bytes(self.path, data)
        return data

    def delete(self) -> None:
        fs, inner = mio.resolve(self.path)
        fs.delete_file(inner)


def _store(out: str):
    if str(out).startswith("s3://"):
        return _S3Lock(out)
    if mio.is_uri(out) and not str(out).startswith("file://"):
        logger.debug("%s: no conditional write for this store; a read-back lease guards --out", out)
        return _LeaseLock(out)
    return _LocalLock(out[len("file://"):] if str(out).startswith("file://") else out)


def _acquire(store, out: str, record: dict[str, Any]) -> Any:
    """Create the lock, or take over a stale one; the version of the lock written."""
    data = json.dumps(record).encode()
    for _ in range(3):  # a lock released or taken over between our create and read: try again
        if store.create(data):
            return store.read()[1]
        found = store.read()
        if found is None:
            continue
        holder, version = found
        if not is_stale(holder):
            raise OutputLockedError(f"--out {out} is in use by another mammo-ray {_describe(holder)} "
                                    f"(lock {LOCK}): wait for it to end, or use another folder")
        if store.take_over(version, data):
            logger.warning("--out %s: took over the lock of a %s that is gone (no heartbeat since %s)", out,
                           _describe(holder), time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime(float(holder.get("heartbeat", 0) or 0))))
            return store.read()[1]
    raise OutputLockedError(f"--out {out}: could not take the lock {LOCK} (other runs keep taking it): "
                            "use another folder")


def _heartbeat(store, record: dict[str, Any], version: Any, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        record["heartbeat"] = time.time()
        try:
            version = store.refresh(version, json.dumps(record).encode())
        except Exception:  # the run goes on; a missed heartbeat only makes the lock look older
            logger.warning("could not refresh the --out lock", exc_info=True)


@contextlib.contextmanager
def hold_out(out: str, stage: str, *, heartbeat_s: float = HEARTBEAT_S) -> Iterator[dict[str, Any]]:
    """Hold the lock of ``out`` for the ``with`` block (released on exceptions too).

    A local ``out`` that did not exist is created for the lock and removed again on exit when
    the run left nothing in it (a refused run leaves no empty folder behind).

    Yields:
        The lock record (host, pid, stage, token, start, heartbeat).

    Raises:
        OutputLockedError: a live run holds the lock (naming its host, pid and start time).
    """
    local = not mio.is_uri(out) or str(out).startswith("file://")
    created = local and not mio.exists(out)
    if local:
        mio.makedirs(out)
    store = _store(out)
    record = _record(stage)
    try:
        version = _acquire(store, out, record)
    except BaseException:
        _remove_if_empty(out, created)
        raise
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(store, record, version, stop, heartbeat_s),
                            name="mammo-ray-out-lock", daemon=True)
    beat.start()
    try:
        yield record
    finally:
        stop.set()
        beat.join()
        _release(store, record["token"])
        _remove_if_empty(out, created)


def _release(store, token: str) -> None:
    found = store.read()
    if found is not None and found[0].get("token") == token:  # never delete a lock another run took over
        store.delete()


def _remove_if_empty(out: str, created: bool) -> None:
    path = out[len("file://"):] if str(out).startswith("file://") else out
    if created and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
