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
   carrying the project's schema metadata, or, for the other stages, every file that was
   not there before the run started), then removes folders left empty. A folder with
   output-like names but no marker is refused even with ``--overwrite``.
3. One rule for every stage (:func:`claim_out`): an ``--out`` that holds a mammo-ray run (a
   marker, or a run's own files for folders written before every stage had one) is refused
   unless ``--overwrite`` (a run of the same stage only) or ``--resume`` is given. Another
   stage's run is refused whatever the flags: an evaluation never writes into the training
   run it evaluates.

Plain files and ``pyarrow.fs`` URIs alike; no Ray here.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable

import pyarrow.fs as pafs

from mammo_ray import io as mio

logger = logging.getLogger(__name__)

MARKER = ".mammo-ray-output.json"
# parts written by the preprocessing tasks, and the hidden temp names of a killed write
_PART = re.compile(r"^part-[0-9a-f]{20}\.parquet$")
_TMP = re.compile(r"^\.part-[0-9a-f]{20}\.parquet\.tmp-\d+$")
# the hidden temp name of any mammo_ray.io.write_bytes that died mid-write (e.g. disk full)
_WRITE_TMP = re.compile(r"^\..+\.tmp-\d+$")
# files the lock module keeps in a held --out (mammo_ray.locks.LOCK; named here so the layers
# need no import): never a run's output, never deleted by --overwrite
_LOCK_NAMES = (".mammo-ray.lock",)
# How a run folder written without a marker (before every stage wrote one) is recognised: the
# files only that stage writes, first match wins. metrics.json / summary.json alone say "a
# run" but not whose (train and evaluate both write metrics.json).
SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("preprocess", ("preprocess.yaml",)),
    ("score", ("score.yaml",)),
    ("explain", ("explain.yaml",)),
    ("tune", ("sweep.yaml", "tune")),
    ("lr-find", ("lr_find.json",)),
    ("train", ("best.pt", "last.pt", "config.yaml", "history.csv", "ray_train")),
    ("evaluate", ("report.md", "report.html")),
    ("demo", (".mammo-ray-demo",)),
    ("unknown", ("metrics.json", "summary.json")),
)
# stages that continue an earlier run with --resume (the others only know --overwrite)
RESUMABLE = ("train", "tune", "score", "explain")


class OutputLocationError(ValueError):
    """``--out`` is a file, overlaps an input, or holds files this stage did not write."""


class OutputInUseError(OutputLocationError):
    """``--out`` holds a mammo-ray run that this run may not replace or continue."""


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


def write_marker(out: str, stage: str, *, files: list[str] | None = None,
                 preexisting: list[str] | None = None) -> None:
    """Mark ``out`` as a ``stage`` output; ``files`` (relative paths) once the run finished;
    ``preexisting``: files that were in ``out`` before the run (never counted as its own)."""
    data = {"stage": stage, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": files is not None,
            "files": sorted(files or [])}
    if preexisting:
        data["preexisting"] = sorted(preexisting)
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


def all_files(out: str) -> list[str]:
    """Every file under ``out``, relative to it, hidden ones included (the marker and lock not)."""
    if not mio.is_dir(out):
        return []
    fs, inner = mio.resolve(out)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        if info.type == pafs.FileType.File:
            rel = info.path[len(inner):].lstrip("/").replace(os.sep, "/")
            if rel != MARKER and rel not in _LOCK_NAMES:
                found.append(rel)
    return sorted(found)


def held_run(out: str) -> tuple[str, str] | None:
    """The mammo-ray run ``out`` holds: ``(stage, evidence)``, or None.

    The marker says it; without one (a folder written before every stage wrote a marker), a
    run's own files do (:data:`SIGNATURES`), with stage ``"unknown"`` for files any run writes.
    """
    if not mio.is_dir(out):
        return None
    marker = read_marker(out)
    if marker is not None:
        return str(marker["stage"]), MARKER
    for stage, names in SIGNATURES:
        present = [n for n in names if mio.exists(mio.join(out, n))]
        if present:
            return stage, ", ".join(present)
    return None


def claim_out(out: str, stage: str, *, overwrite: bool = False, resume: bool = False) -> str | None:
    """The one output rule of every stage, checked before anything is written.

    An ``out`` that holds a mammo-ray run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it) is given, and another stage's run is refused whatever the
    flags. Nothing is deleted or created here.

    Args:
        out: the output folder or URI.
        stage: the stage about to write (``preprocess``, ``train``, ...).
        overwrite, resume: the run's ``--overwrite`` / ``--resume``.

    Returns:
        The stage of the run ``out`` already holds (then ``stage`` itself), or None.

    Raises:
        OutputLocationError: ``out`` is a file.
        OutputInUseError: ``out`` holds a run this one may not replace or continue.
    """
    check_out_location(out)
    held = held_run(out)
    if held is None:
        return None
    kind, evidence = held
    if kind != stage:
        what = "a mammo-ray run" if kind == "unknown" else f"a mammo-ray {kind} run"
        raise OutputInUseError(f"--out {out} holds {what} ({evidence}); mammo-ray {stage} never writes into "
                               "another stage's run: use another folder")
    if overwrite or resume:
        return kind
    flags = "--overwrite to replace it or --resume to continue it" if stage in RESUMABLE else "--overwrite to replace it"
    raise OutputInUseError(f"--out {out} already holds a mammo-ray {stage} run ({evidence}): pass {flags}, "
                           "or use another folder")


def start_out(out: str, stage: str, *, overwrite: bool = False, resume: bool = False) -> None:
    """Make ``out`` this run's, once every check that can refuse the run has passed.

    :func:`claim_out` again (a library call has no CLI in front of it), then with
    ``overwrite`` the earlier run's files are removed (:func:`clear_owned`), and the folder
    is marked as a ``stage`` output that has not finished: files already there that are not
    an earlier run's are recorded as not ours.

    Raises:
        OutputInUseError: see :func:`claim_out`; OutputLocationError: see :func:`clear_owned`.
    """
    held = claim_out(out, stage, overwrite=overwrite, resume=resume)
    if held is not None and overwrite and not resume:
        clear_owned(out, stage)
    previous = read_marker(out)
    if previous is not None:  # resumed (or cleared): the earlier run's own record of what was not its
        preexisting = list(previous.get("preexisting") or [])
    elif held is not None:  # a resumed run from before markers: everything there is that run's
        preexisting = []
    else:
        preexisting = all_files(out)
    mio.makedirs(out)
    write_marker(out, stage, preexisting=preexisting)


def finish_out(out: str, stage: str) -> None:
    """Record every file the finished ``stage`` run wrote in ``out`` (its marker's file list)."""
    previous = read_marker(out) or {}
    preexisting = set(previous.get("preexisting") or [])
    files = [f for f in all_files(out) if f not in preexisting and not _WRITE_TMP.match(posixpath.basename(f))]
    write_marker(out, stage, files=files, preexisting=sorted(preexisting))


def abandon_out(out: str, stage: str) -> None:
    """After a failed or refused ``stage`` run: when it wrote nothing but its unfinished
    marker, remove the marker, so that ``out`` is as it was (and no --overwrite is needed)."""
    marker = read_marker(out)
    if marker is None or marker.get("stage") != stage or marker.get("complete"):
        return
    preexisting = set(marker.get("preexisting") or [])
    if [f for f in all_files(out) if f not in preexisting and not _WRITE_TMP.match(posixpath.basename(f))]:
        return
    fs, inner = mio.resolve(mio.join(out, MARKER))
    fs.delete_file(inner)


def clear_owned(out: str, stage: str, tops: tuple[str, ...] | None = None, *,
                owned: Callable[[str, str], bool] | None = None) -> list[str]:
    """Delete what an earlier ``stage`` run wrote in ``out``, and nothing else.

    Removes the files listed in the marker and the temp files of interrupted writes, plus,
    for a run that died before listing its files, files that ``owned(relative path, full
    path)`` proves are ours (``tops`` given: the files under those names) or that were not in
    ``out`` before it started (``tops`` None: the whole folder), then folders left empty.

    Returns:
        The relative paths removed.

    Raises:
        OutputLocationError: no marker, another stage's marker, or files under ``tops`` that
            no run wrote (they are left in place, and the run refused).
    """
    marker = read_marker(out)
    if marker is None:
        names = tops if tops is not None else tuple(n for _, ns in SIGNATURES for n in ns)
        held = ", ".join(t for t in names if mio.exists(mio.join(out, t))) or "files"
        raise OutputLocationError(f"--out {out} holds {held} but no {MARKER}: it was not written by mammo-ray "
                                  f"{stage} (or by a version before markers); nothing is deleted, use another folder")
    if marker["stage"] != stage:
        raise OutputLocationError(f"--out {out} holds a mammo-ray {marker['stage']} output, not {stage}: use another folder")
    listed = set(marker.get("files") or [])
    preexisting = set(marker.get("preexisting") or [])
    unfinished = not marker.get("complete")
    candidates = list_relative(out, tops) if tops is not None else all_files(out)
    ours, foreign = [], []
    for rel in candidates:
        if rel in preexisting:
            continue
        full = mio.join(out, rel)
        name = posixpath.basename(rel)
        is_ours = (rel in listed or _TMP.match(name) or _WRITE_TMP.match(name)
                   or (owned is not None and owned(rel, full))
                   or (owned is None and unfinished))
        (ours if is_ours else foreign).append(rel)
    if foreign and tops is not None:  # decided before anything is deleted: a refused overwrite leaves the folder as it was
        raise OutputLocationError(f"--out {out}: {len(foreign)} file(s) were not written by mammo-ray {stage} "
                                  f"(e.g. {foreign[0]}); nothing is deleted, use another folder")
    for rel in ours:
        fs, inner = mio.resolve(mio.join(out, rel))
        fs.delete_file(inner)
    _remove_empty_dirs(out, tops if tops is not None else _top_dirs(out))
    logger.info("--overwrite: removed %d file(s) of the previous %s run in %s", len(ours), stage, out)
    return ours


def _top_dirs(out: str) -> tuple[str, ...]:
    """The folders directly in ``out``."""
    fs, inner = mio.resolve(out)
    return tuple(posixpath.basename(i.path.replace(os.sep, "/"))
                 for i in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
                 if i.type == pafs.FileType.Directory)


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
