"""Turn the user's inputs (class folders, CSV manifests, DICOM trees, single files; local or
URIs) into records to process, plus listing-time errors. Nothing is dropped: every candidate
file is either a record or an error; files that are plainly not images (``.csv``, ``.txt``...)
are counted as ``ignored`` by extension in the summary.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
from dataclasses import dataclass, field

from mammo_ray import io as mio
from mammo_ray.config import LABELS, TEST, TRAIN, VAL, LabelMap
from mammo_ray.config.labels import BIRADS_HINT

logger = logging.getLogger(__name__)

#: the classes' display names, in label order (summaries, previews)
CLASS_NAMES = LABELS
UNLABELED = -1
SPLITS = (TRAIN, VAL, TEST)
IMAGE_EXTENSIONS = (".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".pgm", ".pnm", ".ppm",
                    ".tif", ".tiff", "")
DICOM_LIKE = (".dcm", ".dicom", ".dic", "")
PATIENT_COLUMNS = ("patient_id", "source_patient_id")
#: the largest CSV read (manifests, annotations): a million-row manifest is about 100 MB
MAX_CSV_MB = 1024
#: label words kept per job in summary.json's unknown_labels (the column is free text)
MAX_UNKNOWN_LABELS, MAX_LABEL_CHARS = 20, 40


@dataclass
class Listing:
    """What discovery found: records to process, errors, and ignored non-image files."""

    records: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    linked_folders: list[str] = field(default_factory=list)
    #: label words outside the vocabulary that made an image unlabeled (score, explain), by count
    unknown_labels: dict[str, int] = field(default_factory=dict)
    read_elsewhere: set[str] = field(default_factory=set)  # CSVs the job reads itself (explain's --annotations)

    def count_unknown_label(self, value: str) -> None:
        word = value[:MAX_LABEL_CHARS] or "(empty)"
        if word in self.unknown_labels or len(self.unknown_labels) < MAX_UNKNOWN_LABELS:
            self.unknown_labels[word] = self.unknown_labels.get(word, 0) + 1
        else:
            self.unknown_labels["(other)"] = self.unknown_labels.get("(other)", 0) + 1

    @property
    def inputs(self) -> int:
        return len(self.records) + len(self.errors)


def image_id(path: str) -> str:
    """Stable id of a source: a hash of its path (never the patient id)."""
    # surrogateescape: a local name that is not valid UTF-8 still hashes (its raw bytes)
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def printable_path(path: str) -> str:
    """``path`` as valid UTF-8 text: undecodable bytes of a file name shown as ``\\xff``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _ext(path: str) -> str:
    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower()


def _record(path: str, label: int, **extra) -> dict:
    rec = {"path": path, "image_id": image_id(path), "label": label, "patient_id": None, "exam_id": None,
           "laterality": None, "view": None, "split": None}
    rec.update({k: v for k, v in extra.items() if v not in (None, "")})
    return rec


def _error(path: str, reason: str) -> dict:
    return {"path": printable_path(path), "image_id": image_id(path), "reason": reason}


def discover(inputs: list[str], *, unlabeled: bool = False, labels_optional: bool = False,
             labels: LabelMap | None = None, read_elsewhere: tuple[str, ...] = ()) -> Listing:
    """List every input.

    Args:
        inputs: folders (class sub-folders named by the label vocabulary, e.g. ``normal/``,
            ``benign/``, ``malignant/``, or an unlabeled tree such as a DICOM archive), ``.csv``
            manifests, or single image files.
        unlabeled: ignore class folders and manifest labels (label -1).
        labels_optional: labels are read when present and never refuse an image (scoring an
            archive needs no labels): a manifest without a ``label`` column, a file outside the
            class folders, or a label word outside the vocabulary is unlabeled (the words are
            counted in ``Listing.unknown_labels``).
        labels: the label vocabulary (default: :class:`~mammo_ray.config.LabelMap`'s).
        read_elsewhere: files the job reads for another purpose (explain's ``--annotations``):
            not warned about as an unread CSV beside the images.

    Raises:
        ValueError: an input that does not exist (before any work starts).
    """
    labels = labels or LabelMap()
    listing = Listing(read_elsewhere={p if mio.is_uri(p) else os.path.abspath(p) for p in read_elsewhere if p})
    seen: set[str] = set()
    for inp in inputs:
        if not mio.exists(inp):
            raise ValueError(f"input {inp!r} does not exist")
        if mio.is_dir(inp):
            _discover_folder(inp, unlabeled, listing, labels_optional, labels)
        elif _ext(inp) == ".csv":
            _discover_manifest(inp, unlabeled, listing, labels_optional, labels)
        else:
            path = inp if mio.is_uri(inp) else os.path.abspath(inp)
            listing.records.append(_record(path, UNLABELED))
    # the same file given twice (two inputs, or two manifest rows) is processed once
    unique = []
    for rec in listing.records:
        shown = printable_path(rec["path"])
        if shown != rec["path"]:  # Parquet, CSV and JSON store text as UTF-8: such a name cannot be a row
            listing.errors.append({"path": shown, "image_id": rec["image_id"],
                                   "reason": "file name is not valid UTF-8: rename the file"})
            continue
        if rec["path"] in seen:
            listing.errors.append(_error(rec["path"], "duplicate input: the same file is listed more than once"))
            continue
        seen.add(rec["path"])
        unique.append(rec)
    listing.records = unique
    return listing


def _discover_folder(root: str, unlabeled: bool, listing: Listing, labels_optional: bool,
                     labels: LabelMap) -> None:
    report: dict = {"skipped": listing.skipped, "linked": listing.linked_folders}
    files = list(mio.list_files(root, report))
    for folder, reason in report.get("unreadable", []):
        listing.errors.append(_error(folder, reason))
    classes = labels.class_folders
    tops = {mio.relpath(p, root).split("/")[0].lower() for p, _ in files if "/" in mio.relpath(p, root)}
    class_mode = not unlabeled and any(t in classes for t in tops)
    if not class_mode and not unlabeled:
        logger.info("%s has no class folders (%s): its images are unlabeled", root, ", ".join(classes))
    for path, _size in files:
        ext = _ext(path)
        if ext not in IMAGE_EXTENSIONS:
            listing.ignored[ext] = listing.ignored.get(ext, 0) + 1
            known = (path if mio.is_uri(path) else os.path.abspath(path)) in listing.read_elsewhere
            if ext == ".csv" and "/" not in mio.relpath(path, root) and not known:
                # a manifest beside the images is easy to mistake for one that is read
                logger.warning("%s is not read: a folder's labels come from its class folders; give the CSV "
                               "itself as the input to use its labels and patient ids", path)
            continue
        rel = mio.relpath(path, root)
        if not class_mode:
            listing.records.append(_record(path, UNLABELED))
            continue
        parts = rel.split("/")
        top = parts[0].lower() if len(parts) > 1 else None
        if labels_optional and top not in classes:
            listing.records.append(_record(path, UNLABELED))  # scoring needs no label
        elif top is None:
            listing.errors.append(_error(path, f"not inside a class folder: use one of {', '.join(classes)} "
                                               "(or --unlabeled, or --negative/--positive to name more)"))
        elif top not in classes:
            listing.errors.append(_error(path, f"unknown class folder {parts[0]!r}: use one of {', '.join(classes)} "
                                               "(or --unlabeled, or --negative/--positive to name more)"))
        else:
            listing.records.append(_record(path, labels.label_of(top)))


def read_csv_text(path: str, what: str) -> str:
    """A CSV file's text (UTF-8, BOM allowed).

    Raises:
        ValueError: naming the file and the first byte that is not UTF-8; a FIFO or device
            (reading one blocks or never ends) or a file over ``MAX_CSV_MB``.
    """
    try:
        data = mio.read_input(path, MAX_CSV_MB * mio.MB)
    except mio.InputRefused as exc:
        raise ValueError(f"{what} {path}: {str(exc).replace('--max-file-mb', 'a CSV')}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}): "
                         "save it as UTF-8") from None


def _discover_manifest(manifest: str, unlabeled: bool, listing: Listing, labels_optional: bool,
                       labels: LabelMap) -> None:
    text = read_csv_text(manifest, "manifest")
    reader = csv.DictReader(io.StringIO(text))
    # "path, label" (a space after the comma) names the same columns as "path,label"
    reader.fieldnames = [c.strip() for c in (reader.fieldnames or [])]
    columns = list(reader.fieldnames)
    if labels_optional and "label" not in columns:
        unlabeled = True
    needed = ["path"] + ([] if unlabeled else ["label"])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"manifest {manifest}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
    patient_col = next((c for c in PATIENT_COLUMNS if c in columns), None)
    root = posixpath.dirname(manifest) if mio.is_uri(manifest) else os.path.dirname(os.path.abspath(manifest))
    # rows of blank cells (",,") are no inputs: a manifest of them lists nothing, and the job says so
    numbered = [(reader.line_num, row) for row in reader
                if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    if not unlabeled:
        _check_birads(manifest, [row for _, row in numbered], labels, labels_optional)
    candidates = []
    for lineno, row in numbered:
        raw = (row.get("path") or "").strip()
        if not raw:
            listing.errors.append(_error(f"{manifest} line {lineno}", "manifest row has an empty path"))
            continue
        path, problem = manifest_path(raw, root)
        if problem:
            listing.errors.append(_error(path, problem))
            continue
        label = UNLABELED
        if not unlabeled:
            value = (row.get("label") or "").strip()
            found = labels.label_of(value)
            if found is None and labels_optional:
                listing.count_unknown_label(value.lower())  # scoring needs no label: never a refusal
            elif found is None:
                listing.errors.append(_error(path, labels.unknown(value)))
                continue
            else:
                label = found
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS + ("external",):
            listing.errors.append(_error(path, f"split {split!r}: use one of {', '.join(SPLITS)}, external"))
            continue
        candidates.append(_record(path, label, split=split,
                                  patient_id=(row.get(patient_col) or "").strip() if patient_col else None,
                                  exam_id=(row.get("exam_id") or "").strip() or None,
                                  laterality=(row.get("laterality") or "").strip().upper() or None,
                                  view=(row.get("view") or "").strip().upper() or None))
    exists = _exist_by_store([c["path"] for c in candidates])
    for rec, ok in zip(candidates, exists, strict=True):
        if ok:
            listing.records.append(rec)
        else:
            listing.errors.append(_error(rec["path"], _missing_reason(rec["path"])))


def _missing_reason(path: str) -> str:
    """Why a manifest row is not a file to read: absent, or there but not a regular file (Arrow
    calls a FIFO or a device ``Unknown``, which is not "not found")."""
    if not mio.is_uri(path):
        try:
            kind = mio.file_kind(os.stat(path).st_mode)  # links followed, as the worker's read does
        except OSError:
            kind = None
        if kind:
            return f"not a regular file ({kind})"
    return "file listed in the manifest not found"


def manifest_path(raw: str, root: str) -> tuple[str, str | None]:
    """Where a manifest row's ``path`` points: a URI as given (``s3://other-bucket/...``, also
    from a local manifest); an absolute path as given (on an object store: from the store's
    root); a relative one from the manifest's folder, ``..`` included. The user wrote the
    manifest, so it may point anywhere it can read; ``--out`` is checked against every row
    (``outputs.check_inputs_vs_out``). Returns (path, reason it cannot be read or None)."""
    if mio.is_uri(raw):
        scheme, rest = raw.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}" if rest else raw, None
    if mio.is_uri(root):
        # normalised after the scheme: normpath would fold "s3://" into "s3:/"
        scheme, rest = root.split("://", 1)
        joined = posixpath.normpath(raw.lstrip("/") if raw.startswith("/") else posixpath.join(rest, raw))
        if joined == ".." or joined.startswith("../"):
            return f"{scheme}://{joined}", f"manifest path {raw!r} climbs above the store's root {scheme}://"
        return f"{scheme}://{joined}", None
    return os.path.normpath(os.path.join(root, os.path.expanduser(raw))), None


def _check_birads(manifest: str, rows: list[dict], labels: LabelMap, labels_optional: bool) -> None:
    """Numbers outside the vocabulary beside its 0 and 1 look like BI-RADS categories, whose 1
    is a negative screen: reading the 0/1 rows as cancer 0/1 would be a silent error.

    Raises:
        ValueError: for a job that needs labels (score and explain read such a manifest unlabeled).
    """
    values = {(r.get("label") or "").strip() for r in rows}
    others = sorted(v for v in values if v.isdigit() and labels.label_of(v) is None)
    if not others or not any(labels.label_of(v) is not None for v in values if v.isdigit()):
        return
    message = (f"manifest {manifest}: label values {', '.join(others)} beside "
               f"{', '.join(sorted(v for v in values if v.isdigit() and labels.label_of(v) is not None))} look like "
               f"BI-RADS categories; {BIRADS_HINT}")
    if not labels_optional:
        raise ValueError(message)
    logger.warning("%s: its numeric labels are read as unlabeled", message)
    for r in rows:
        if (r.get("label") or "").strip().isdigit():
            r["label"] = ""


def _exist_by_store(paths: list[str]) -> list[bool]:
    """``_exist_many`` per filesystem: a manifest's rows may mix local paths and URIs of
    several stores or buckets."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        key = p.split("://", 1)[0] + "://" + p.split("://", 1)[1].split("/", 1)[0] if mio.is_uri(p) else ""
        groups.setdefault(key, []).append(i)
    found = [False] * len(paths)
    for idx in groups.values():
        for i, ok in zip(idx, _exist_many([paths[i] for i in idx]), strict=True):
            found[i] = ok
    return found


def _exist_many(paths: list[str]) -> list[bool]:
    if not paths:
        return []
    import pyarrow.fs as pafs

    fs, _ = mio.resolve(paths[0])
    inner = [mio.resolve(p)[1] for p in paths]
    infos = mio.on_store(paths[0], fs, lambda: fs.get_file_info(inner))
    return [i.type == pafs.FileType.File for i in infos]


def needs_header_probe(rec: dict) -> bool:
    """DICOM-like files without a patient id from a manifest: the header has one."""
    return rec.get("patient_id") in (None, "") and _ext(rec["path"]) in DICOM_LIKE
