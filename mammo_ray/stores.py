"""Object stores (``s3://``, ``gs://``) built with a connect-and-request timeout and bounded
retries, and their failures turned into one line that names the URI and the cause.

Arrow's defaults leave a store that never answers waiting for minutes: ``FileSystem.from_uri``
gives S3 a 10-attempt retry strategy (a silent endpoint took 99 s, 31 connections) and GCS
google-cloud-cpp's 15-minute retry window (``gs://no-such-bucket`` without credentials
retried the metadata-server token lookup for all of it). Here:

- S3: ``connect_timeout`` and ``request_timeout`` (on Linux curl's low-speed limit: a request
  with no byte for that long fails) and ``AwsStandardS3RetryStrategy(max_attempts)``.
- GCS: ``retry_time_limit`` (see :func:`_gcs_retry_window`). Arrow exposes no per-request timeout for GCS, so every
  operation this project makes on a GCS store runs under a deadline (:func:`call`): a
  request to a store that accepts the connection and never answers would otherwise wait
  forever (measured: still waiting after 120 s).

Both read ``MAMMO_RAY_REMOTE_TIMEOUT`` (seconds, default 10) and ``MAMMO_RAY_REMOTE_ATTEMPTS``
(default 3). ``gs://`` against an emulator (fake-gcs-server...): ``STORAGE_EMULATOR_HOST`` or
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (``http://host:port``), anonymous, as Google's own clients
read them; ``s3://``: ``AWS_ENDPOINT_URL`` as before.
"""
from __future__ import annotations

import datetime
import os
import re
import threading
from typing import Any, TypeVar
from collections.abc import Callable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

T = TypeVar("T")

#: the schemes a path may carry; anything else of the form ``name://`` is refused up front
#: (``hdfs``, ``abfs`` and the like are not built with timeouts here, nor tested)
SUPPORTED_SCHEMES = ("s3", "gs", "gcs", "file")
TIMEOUT_ENV = "MAMMO_RAY_REMOTE_TIMEOUT"
ATTEMPTS_ENV = "MAMMO_RAY_REMOTE_ATTEMPTS"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_ATTEMPTS = 3
GCS_EMULATOR_ENVS = ("STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT")
#: what decides how a store is built: a cached filesystem is reused only while these are unchanged
STORE_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS", TIMEOUT_ENV, ATTEMPTS_ENV, *GCS_EMULATOR_ENVS)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class RemoteStoreError(OSError):
    """An object store that did not answer, or answered with a failure: one line, URI first."""

    user_facing = True  # the CLI prints it as it is (no exception name, no traceback hint)


def scheme_of(path: str) -> str | None:
    """The ``name`` of a ``name://...`` path, else None (a plain local path).

    Raises:
        ValueError: a scheme that is not supported, naming the supported ones.
    """
    m = _SCHEME.match(str(path))
    if m is None:
        return None
    scheme = m.group(1)
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"{path}: scheme {scheme!r} is not supported: use a local path or "
                         f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)}")
    return scheme


def settings() -> tuple[float, int]:
    """``(timeout in seconds, attempts)`` from the environment.

    Raises:
        ValueError: a value that is not a positive number (timeout <= 3600, attempts <= 20).
    """
    raw_t, raw_a = os.environ.get(TIMEOUT_ENV, ""), os.environ.get(ATTEMPTS_ENV, "")
    try:
        timeout = float(raw_t) if raw_t.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout <= 3600:  # also refuses nan
        raise ValueError(f"{TIMEOUT_ENV}={raw_t!r}: use seconds in (0, 3600]")
    try:
        attempts = int(raw_a) if raw_a.strip() else DEFAULT_ATTEMPTS
    except ValueError:
        attempts = 0
    if not 1 <= attempts <= 20:
        raise ValueError(f"{ATTEMPTS_ENV}={raw_a!r}: use a whole number in [1, 20]")
    return timeout, attempts


def deadline_s() -> float:
    """How long one operation on a store may take before it counts as no answer: every
    attempt, plus one timeout more, so that a store's own failure (GCS's retry window is
    ``timeout * attempts``) arrives first and keeps its cause."""
    timeout, attempts = settings()
    return timeout * (attempts + 1)


def build(prefix: str) -> pafs.FileSystem:
    """The filesystem of ``scheme://bucket``, with this module's timeouts and retries.

    Arrow's ``from_uri`` still reads the endpoint, region and credentials (as before); its
    options are then rebuilt with the timeouts (``__reduce__`` is pyarrow's own pickling
    form of a filesystem's constructor arguments).
    """
    timeout, attempts = settings()
    scheme = scheme_of(prefix)
    if scheme in ("gs", "gcs"):
        emulator = next((os.environ[k] for k in GCS_EMULATOR_ENVS if os.environ.get(k)), None)
        if emulator:
            url = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
            return pafs.GcsFileSystem(anonymous=True, scheme=url.scheme or "http", endpoint_override=url.netloc,
                                      retry_time_limit=_gcs_retry_window(timeout))
        fs = call(prefix, lambda: pafs.FileSystem.from_uri(prefix)[0])
        kwargs = dict(fs.__reduce__()[1][0])
        kwargs["retry_time_limit"] = _gcs_retry_window(timeout)
        return pafs.GcsFileSystem(**kwargs)
    fs = call(prefix, lambda: pafs.FileSystem.from_uri(prefix)[0])
    if isinstance(fs, pafs.S3FileSystem):
        kwargs = dict(fs.__reduce__()[1][0])
        kwargs.update(connect_timeout=timeout, request_timeout=timeout,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
        return pafs.S3FileSystem(**kwargs)
    return fs


def _gcs_retry_window(timeout: float) -> datetime.timedelta:
    """GCS's retry window: one timeout. google-cloud-cpp finishes the backoff sleep it is in when
    the window closes (a 10 s window failed after 25 s, a 30 s one after 46 s, measured without
    credentials), so a longer window would outlast :func:`deadline_s` and lose the cause."""
    return datetime.timedelta(seconds=max(1.0, timeout))


def call(uri: str, fn: Callable[[], T], *, bounded: bool = True) -> T:
    """Run one store operation on ``uri``; a failure becomes a :class:`RemoteStoreError`.

    With ``bounded``, it runs in a daemon thread and is abandoned after :func:`deadline_s`
    (a call blocked inside Arrow cannot be interrupted; the thread ends with the request, or
    with the process). Used for GCS, which has no request timeout in Arrow, and for the
    first contact with any store (``from_uri`` may resolve a bucket's region).

    Raises:
        RemoteStoreError: ``"<uri>: no answer from the store within N s (timeout; ...)"`` or
            ``"<uri>: <the store's error, first line>"``.
    """
    if not bounded:
        try:
            return fn()
        except OSError as exc:
            raise _failure(uri, exc) from None
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=run, name="mammo-ray-store-call", daemon=True)
    worker.start()
    limit = deadline_s()
    worker.join(limit)
    if worker.is_alive():
        raise RemoteStoreError(_no_answer(uri, limit))
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, OSError) and not isinstance(exc, RemoteStoreError):
            raise _failure(uri, exc) from None
        raise exc
    return box["value"]


def _no_answer(uri: str, seconds: float) -> str:
    timeout, attempts = settings()
    return (f"{uri}: no answer from the store within {seconds:g} s (timeout; {attempts} attempt(s) of {timeout:g} s: "
            f"set {TIMEOUT_ENV} / {ATTEMPTS_ENV} to wait longer)")


def _failure(uri: str, exc: OSError) -> RemoteStoreError:
    """One line for a store's failure: a timeout says so; missing GCS credentials say so, with
    the underlying error (google-cloud-cpp puts it after 300 characters of preamble); otherwise
    the store's own message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "curlCode: 28" in text or "Timeout was reached" in text or "timed out" in text.lower():
        timeout, attempts = settings()
        return RemoteStoreError(_no_answer(uri, timeout * attempts))
    text = re.sub(r" error_info=\{.*$", "", text)  # google-cloud-cpp's retry metadata repeats the message
    if "access token" in text:
        under = text.split("The underlying error message was:", 1)[-1].strip(" )") if "underlying" in text else ""
        return RemoteStoreError(f"{uri}: no credentials for the store (could not get an OAuth2 access token"
                                f"{': ' + under[:200] if under else ''}): set GOOGLE_APPLICATION_CREDENTIALS to a "
                                "service-account key file, or run where the metadata server answers")
    return RemoteStoreError(f"{uri}: {text[:400]}")


def is_gcs(fs: pafs.FileSystem) -> bool:
    """Operations on this filesystem need :func:`call`'s deadline (Arrow gives GCS no request timeout)."""
    return isinstance(fs, pafs.GcsFileSystem)
