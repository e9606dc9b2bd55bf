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
from mammo_ray.config import LABELS, TEST, TRAIN, VAL

logger = logging.getLogger(__name__)

CLASS_NAMES = LABELS
UNLABELED = -1
SPLITS = (TRAIN, VAL, TEST)
IMAGE_EXTENSIONS = (".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".pgm", ".pnm", ".ppm",
                    ".tif", ".tiff", "")
DICOM_LIKE = (".dcm", ".dicom", ".dic", "")
PATIENT_COLUMNS = ("patient_id", "source_patient_id")
LABEL_VALUES = {LABELS[0]: 0, "0": 0, LABELS[1]: 1, "1": 1}


@dataclass
class Listing:
    """What discovery found: records to process, errors, and ignored non-image files."""

    records: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    linked_folders: list[str] = field(default_factory=list)

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


def discover(inputs: list[str], *, unlabeled: bool = False, labels_optional: bool = False) -> Listing:
    """List every input.

    Args:
        inputs: folders (class sub-folders ``benign/``, ``malignant/``, or an unlabeled
            tree such as a DICOM archive), ``.csv`` manifests, or single image files.
        unlabeled: ignore class folders and manifest labels (label -1).
        labels_optional: a manifest without a ``label`` column, or a file outside the class
            folders, is unlabeled instead of an error (scoring an archive needs no labels;
            they are kept when present).

    Raises:
        ValueError: an input that does not exist (before any work starts).
    """
    listing = Listing()
    seen: set[str] = set()
    for inp in inputs:
        if not mio.exists(inp):
            raise ValueError(f"input {inp!r} does not exist")
        if mio.is_dir(inp):
            _discover_folder(inp, unlabeled, listing, labels_optional)
        elif _ext(inp) == ".csv":
            _discover_manifest(inp, unlabeled, listing, labels_optional)
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


def _discover_folder(root: str, unlabeled: bool, listing: Listing, labels_optional: bool = False) -> None:
    report: dict = {"skipped": listing.skipped, "linked": listing.linked_folders}
    files = list(mio.list_files(root, report))
    for folder, reason in report.get("unreadable", []):
        listing.errors.append(_error(folder, reason))
    tops = {mio.relpath(p, root).split("/")[0].lower() for p, _ in files if "/" in mio.relpath(p, root)}
    class_mode = not unlabeled and any(t in CLASS_NAMES for t in tops)
    if not class_mode and not unlabeled:
        logger.info("%s has no class folders (%s): its images are unlabeled", root, ", ".join(CLASS_NAMES))
    for path, size in files:
        ext = _ext(path)
        if ext not in IMAGE_EXTENSIONS:
            listing.ignored[ext] = listing.ignored.get(ext, 0) + 1
            if ext == ".csv" and "/" not in mio.relpath(path, root):
                # a manifest beside the images is easy to mistake for one that is read
                logger.warning("%s is not read: a folder's labels come from its class folders; give the CSV "
                               "itself as the input to use its labels and patient ids", path)
            continue
        rel = mio.relpath(path, root)
        if not class_mode:
            listing.records.append(_record(path, UNLABELED))
            continue
        parts = rel.split("/")
        if labels_optional and (len(parts) == 1 or parts[0].lower() not in CLASS_NAMES):
            listing.records.append(_record(path, UNLABELED))  # scoring needs no label
        elif len(parts) == 1:
            listing.errors.append(_error(path, f"not inside a class folder: use one of {', '.join(CLASS_NAMES)} (or --unlabeled)"))
        elif parts[0].lower() not in CLASS_NAMES:
            listing.errors.append(_error(path, f"unknown class folder {parts[0]!r}: use one of {', '.join(CLASS_NAMES)} (or --unlabeled)"))
        else:
            listing.records.append(_record(path, CLASS_NAMES.index(parts[0].lower())))


def _inside(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def read_csv_text(path: str, what: str) -> str:
    """A CSV file's text (UTF-8, BOM allowed).

    Raises:
        ValueError: naming the file and the first byte that is not UTF-8.
    """
    data = mio.read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}): "
                         "save it as UTF-8") from None


def _discover_manifest(manifest: str, unlabeled: bool, listing: Listing, labels_optional: bool = False) -> None:
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
    if mio.is_uri(manifest):
        root = posixpath.dirname(manifest)
    else:
        root = os.path.dirname(os.path.abspath(manifest))
    rows = list(reader)
    candidates = []
    for lineno, row in enumerate(rows, start=2):
        raw = (row.get("path") or "").strip()
        if mio.is_uri(root):
            # normalised after the scheme: normpath would fold "s3://" into "s3:/"
            scheme, rest = root.split("://", 1)
            path = raw if mio.is_uri(raw) else f"{scheme}://{posixpath.normpath(posixpath.join(rest, raw))}"
        else:
            path = os.path.normpath(os.path.join(root, raw))
        where = f"{manifest} line {lineno}"
        if not raw:
            listing.errors.append(_error(where, "manifest row has an empty path"))
            continue
        if not _inside(path, root):
            listing.errors.append(_error(path, f"manifest path {raw!r} escapes the manifest's folder {root}"))
            continue
        label = UNLABELED
        if not unlabeled:
            value = (row.get("label") or "").strip().lower()
            if value not in LABEL_VALUES:
                listing.errors.append(_error(path, f"label {value!r}: use one of benign, malignant, 0, 1"))
                continue
            label = LABEL_VALUES[value]
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS + ("external",):
            listing.errors.append(_error(path, f"split {split!r}: use one of {', '.join(SPLITS)}, external"))
            continue
        candidates.append(_record(path, label, split=split,
                                  patient_id=(row.get(patient_col) or "").strip() if patient_col else None,
                                  exam_id=(row.get("exam_id") or "").strip() or None,
                                  laterality=(row.get("laterality") or "").strip().upper() or None,
                                  view=(row.get("view") or "").strip().upper() or None))
    exists = _exist_many([c["path"] for c in candidates])
    for rec, ok in zip(candidates, exists):
        if ok:
            listing.records.append(rec)
        else:
            listing.errors.append(_error(rec["path"], "file listed in the manifest not found"))


def _exist_many(paths: list[str]) -> list[bool]:
    if not paths:
        return []
    import pyarrow.fs as pafs

    fs, _ = mio.resolve(paths[0])
    inner = [mio.resolve(p)[1] for p in paths]
    infos = fs.get_file_info(inner)
    return [i.type == pafs.FileType.File for i in infos]


def needs_header_probe(rec: dict) -> bool:
    """DICOM-like files without a patient id from a manifest: the header has one."""
    return rec.get("patient_id") in (None, "") and _ext(rec["path"]) in DICOM_LIKE
