"""Output folders that a run owns: where ``--out`` may be, and what ``--overwrite`` may delete.

Two rules keep a user's data safe from the project's own clean-up:

1. ``--out`` never overlaps an input. An output folder that contains an input (a source
   image, a manifest, a preprocessed set) or lies inside an input folder is refused before
   any work, for every stage: an overwrite there could delete sources, and a resumed job
   would re-ingest its own outputs as inputs.
2. A run only ever deletes what a run of the same stage wrote. Each output folder holds a
   marker (``.mammo-ray-output.json``) naming its stage and, once the run finished, every
   file it wrote. ``--overwrite`` removes exactly those files (plus, for a run that died
   before writing its list, files whose *content* proves they are ours: Parquet parts
   carrying the project's schema metadata), then removes folders left empty. A folder
   with output-like names but no marker is refused even with ``--overwrite``.

Plain files and ``pyarrow.fs`` URIs alike; no Ray here.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
from typing import Callable, Iterable

import pyarrow.fs as pafs

from mammo_ray import io as mio

logger = logging.getLogger(__name__)

MARKER = ".mammo-ray-output.json"
# parts written by the preprocessing tasks, and the hidden temp names of a killed write
_PART = re.compile(r"^part-[0-9a-f]{20}\.parquet$")
_TMP = re.compile(r"^\.part-[0-9a-f]{20}\.parquet\.tmp-\d+$")


class OutputLocationError(ValueError):
    """``--out`` is a file, overlaps an input, or holds files this stage did not write."""


def _norm(path: str) -> str:
    """A comparable form of a path: real local path (symlinks resolved) or a URI without '/' ends."""
    if mio.is_uri(path) and not str(path).startswith("file://"):
        scheme, rest = str(path).split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    if str(path).startswith("file://"):
        path = "/" + str(path)[len("file://"):].lstrip("/")
    return os.path.realpath(os.path.abspath(str(path)))


def inside(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or lies under it (after normalising both)."""
    p, r = _norm(path), _norm(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


def check_out_location(out: str, *, folders: Iterable[str] = (), files: Iterable[str] = (),
                       flag: str = "--out") -> None:
    """Refuse an output location that is a file or overlaps the inputs.

    Args:
        out: the output folder or URI.
        folders: input folders: ``out`` may neither contain one nor lie inside one.
        files: input files (images, manifests, data files): ``out`` may not contain one.

    Raises:
        OutputLocationError: naming the input it overlaps.
    """
    if mio.exists(out) and not mio.is_dir(out):
        raise OutputLocationError(f"{flag} {out} is an existing file: give a folder")
    for folder in folders:
        if inside(out, folder):
            raise OutputLocationError(f"{flag} {out} is inside the input folder {folder}: write outputs elsewhere")
        if inside(folder, out):
            raise OutputLocationError(f"{flag} {out} contains the input folder {folder}: write outputs elsewhere")
    norm_out = _norm(out).rstrip("/") + "/"
    for f in files:
        if (_norm(f) + "/").startswith(norm_out):
            raise OutputLocationError(f"{flag} {out} contains the input {f}: write outputs elsewhere")


def check_inputs_vs_out(inputs: list[str], record_paths: Iterable[str], out: str, *,
                        extra_folders: Iterable[str] = ()) -> None:
    """``--out`` against a job's inputs (folders, manifests, files) and the files they listed;
    ``extra_folders``: real paths of symlinked folders the listing followed (a link inside an
    input pointing at ``--out`` would otherwise make outputs inputs).

    Raises:
        OutputLocationError: see :func:`check_out_location`.
    """
    folders = [i for i in inputs if mio.is_dir(i)]
    files = [i for i in inputs if not mio.is_dir(i)]
    # files found in a folder input are covered by the folder's own check; manifest rows may
    # point anywhere under the manifest's folder, so each of those is checked (cheap prefix
    # test first: one realpath per manifest row, none per file of a million-image tree)
    prefixes = tuple(str(f).rstrip("/") + "/" for f in folders) + tuple(
        os.path.abspath(f).rstrip("/") + "/" for f in folders if not mio.is_uri(f))
    listed = [p for p in record_paths if not str(p).startswith(prefixes)]
    check_out_location(out, folders=[*folders, *extra_folders], files=[*files, *listed])


def read_marker(out: str) -> dict | None:
    """The marker of an output folder, or None when it has none (or an unreadable one)."""
    path = mio.join(out, MARKER)
    if not mio.exists(path):
        return None
    try:
        data = json.loads(mio.read_bytes(path))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) and "stage" in data else None


def write_marker(out: str, stage: str, *, files: list[str] | None = None) -> None:
    """Mark ``out`` as a ``stage`` output; ``files`` (relative paths) once the run finished."""
    data = {"stage": stage, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": files is not None,
            "files": sorted(files or [])}
    mio.write_bytes(mio.join(out, MARKER), json.dumps(data, indent=1).encode())


def list_relative(out: str, tops: Iterable[str]) -> list[str]:
    """Files under ``out/<top>`` (or the file ``out/<top>``), relative to ``out``, hidden ones included."""
    found = []
    for top in tops:
        path = mio.join(out, top)
        if not mio.exists(path):
            continue
        if not mio.is_dir(path):
            found.append(top)
            continue
        fs, inner = mio.resolve(path)
        for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            if info.type == pafs.FileType.File:
                found.append(posixpath.join(top, info.path[len(inner):].lstrip("/").replace(os.sep, "/")))
    return sorted(found)


def is_project_parquet(path: str) -> bool:
    """True when ``path`` is a Parquet part written by this project (its schema carries our spec)."""
    import pyarrow.parquet as pq

    from mammo_ray.data.parquet import SPEC_KEY

    name = posixpath.basename(str(path).replace(os.sep, "/"))
    if not _PART.match(name):
        return False
    try:
        fs, inner = mio.resolve(path)
        meta = pq.read_schema(inner, filesystem=fs).metadata or {}
    except Exception:  # not Parquet at all: not ours
        return False
    return SPEC_KEY in meta


def clear_owned(out: str, stage: str, tops: tuple[str, ...], *,
                owned: Callable[[str, str], bool] | None = None) -> list[str]:
    """Delete what an earlier ``stage`` run wrote in ``out``, and nothing else.

    Removes the files listed in the marker, plus files under ``tops`` that ``owned(relative
    path, full path)`` proves are ours (for a run that died before listing them), then
    folders left empty.

    Returns:
        The relative paths removed.

    Raises:
        OutputLocationError: no marker, another stage's marker, or files under ``tops`` that
            no run wrote (they are left in place, and the run refused).
    """
    marker = read_marker(out)
    if marker is None:
        raise OutputLocationError(f"--out {out} holds {', '.join(t for t in tops if mio.exists(mio.join(out, t)))} "
                                  f"but no {MARKER}: it was not written by mammo-ray {stage}; "
                                  "nothing is deleted, use another folder")
    if marker["stage"] != stage:
        raise OutputLocationError(f"--out {out} holds a mammo-ray {marker['stage']} output, not {stage}: use another folder")
    listed = set(marker.get("files") or [])
    ours, foreign = [], []
    for rel in list_relative(out, tops):
        full = mio.join(out, rel)
        is_ours = rel in listed or _TMP.match(posixpath.basename(rel)) or (owned is not None and owned(rel, full))
        (ours if is_ours else foreign).append(rel)
    if foreign:  # decided before anything is deleted: a refused overwrite leaves the folder as it was
        raise OutputLocationError(f"--out {out}: {len(foreign)} file(s) were not written by mammo-ray {stage} "
                                  f"(e.g. {foreign[0]}); nothing is deleted, use another folder")
    for rel in ours:
        fs, inner = mio.resolve(mio.join(out, rel))
        fs.delete_file(inner)
    _remove_empty_dirs(out, tops)
    logger.info("--overwrite: removed %d file(s) of the previous %s run in %s", len(ours), stage, out)
    return ours


def _remove_empty_dirs(out: str, tops: Iterable[str]) -> None:
    for top in tops:
        path = mio.join(out, top)
        if not mio.is_dir(path):
            continue
        fs, inner = mio.resolve(path)
        dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                if i.type == pafs.FileType.Directory]
        for d in sorted(dirs, key=len, reverse=True) + [inner]:
            if not fs.get_file_info(pafs.FileSelector(d, recursive=False)):
                fs.delete_dir(d)
