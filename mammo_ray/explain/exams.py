"""Breast- and exam-level results of an archive job, from the header fields its images carry.

A DICOM's StudyInstanceUID, PatientID, ImageLaterality (or Laterality) and ViewPosition, or a
manifest's ``exam_id``, ``patient_id``, ``laterality`` and ``view`` columns, say which images
belong together. The driver turns the identifying ones into pseudonyms (HMAC under the user's
patient key, as preprocessing does; the key never reaches a worker) and keeps them per image in
``_meta/`` parts, so a resumed run still has every image's keys.

``breasts.parquet``: one row per (exam, laterality); ``exams.parquet``: one row per exam. Each
has the max and mean of its images' probabilities (evaluate's ``aggregate``), the decision at
the job's threshold for both, the label when every image has one, and the views present.
Images without an exam key (or, for the breast table, without a laterality) stay image-level
and are counted. Conflicting metadata is reported, not guessed: an exam id under two patient
keys, or two images of the same breast and view, keeps that exam's images image-level, with
one line per image in ``errors.csv`` (``metadata conflict``; the image keeps its score row).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import pandas as pd
import pyarrow as pa

from mammo_ray import io as mio
from mammo_ray.data.parquet import write_table
from mammo_ray.data.pipeline import probe_batch
from mammo_ray.explain.results import META, META_SCHEMA, read_parts
from mammo_ray.metrics import aggregate
from mammo_ray.privacy import PatientSecret, load_patient_secret, patient_key

logger = logging.getLogger(__name__)

LATERALITY = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
CONFLICT = "metadata conflict (image kept, scored image-level only)"
PER_IMAGE_MIN = 4  # fewer images than this: one image per exam is no evidence of per-image keys


def pseudonymise(status: pd.DataFrame, secret: PatientSecret) -> pd.DataFrame:
    """Status rows (raw header fields) -> meta rows: patient and exam pseudonyms, laterality
    (L/R, else None) and view. An image without an exam id takes its patient's key as its exam
    (a manifest without ``exam_id``: one exam per patient), flagged by ``exam_from_patient``."""
    rows = []
    for r in status.to_dict("records"):
        pid, exam = str(r.get("patient_id") or "").strip(), str(r.get("exam_id") or "").strip()
        pkey = patient_key(pid, secret) if pid else None
        ekey = patient_key("exam:" + exam, secret) if exam else (None if pkey is None else "p-" + pkey)
        rows.append({"image_id": r["image_id"], "patient_key": pkey, "exam_key": ekey,
                     "laterality": LATERALITY.get(str(r.get("laterality") or "").strip().upper()),
                     "view": str(r.get("view") or "").strip().upper() or None})
    return pd.DataFrame(rows, columns=[f.name for f in META_SCHEMA])


class MetaWriter:
    """Writes a ``_meta`` part for each streamed batch of status rows (named by its ids, so a
    rerun of the same batch rewrites it). The patient key is loaded on the first batch that
    carries a patient or exam id, so a folder of plain PNGs never needs one."""

    def __init__(self, out: str, key_file: str | None) -> None:
        self.out, self.key_file, self._secret = out, key_file, None

    def secret(self) -> PatientSecret:
        if self._secret is None:
            self._secret = load_patient_secret(self.key_file, forbidden=(self.out,))
        return self._secret

    def write(self, status: pd.DataFrame) -> None:
        if not len(status):
            return
        ids = status[["patient_id", "exam_id"]].fillna("").astype(str).apply(lambda c: c.str.strip())
        if (ids != "").to_numpy().any():
            meta = pseudonymise(status, self.secret())
        else:  # no identifiers at all: the same rows without loading a key
            meta = pseudonymise(status.assign(patient_id="", exam_id=""), None)  # type: ignore[arg-type]
        digest = hashlib.sha1("\n".join(sorted(meta["image_id"])).encode()).hexdigest()[:20]
        write_table(pa.Table.from_pandas(meta, schema=META_SCHEMA, preserve_index=False),
                    mio.join(self.out, META, f"part-{digest}.parquet"))


def _conflicts(df: pd.DataFrame) -> tuple[set[str], list[dict]]:
    """Exams whose metadata contradict itself, and one error line per image in them."""
    bad: dict[str, str] = {}
    patients = df.groupby("exam_key")["patient_key"].nunique(dropna=False)
    for exam in patients[patients > 1].index:
        bad[exam] = f"exam {exam[:10]} has images of {int(patients[exam])} patient keys"
    both = df.dropna(subset=["laterality", "view"])
    dup = both.groupby(["exam_key", "laterality", "view"]).size()
    for (exam, lat, view), n in dup[dup > 1].items():
        bad.setdefault(exam, f"exam {exam[:10]} has {int(n)} images of breast {lat} view {view}")
    lines = [{"image_id": r.image_id, "path": r.source_path, "reason": f"{CONFLICT}: {bad[r.exam_key]}"}
             for r in df[df["exam_key"].isin(bad)].itertuples()]
    return set(bad), lines


def _table(df: pd.DataFrame, keys: list[str], threshold: float) -> pd.DataFrame:
    """One row per group of ``keys``: its images' max and mean probability (evaluate's
    ``aggregate``), the decision at ``threshold`` for both, the label (a group is malignant if
    any image is) when all its images have one, else -1, and the views present."""
    cols = [*keys, "patient_key", "n_images", "views", "image_ids", "probability_max", "probability_mean",
            "predicted_max", "predicted_mean", "label"]
    if not len(df):
        return pd.DataFrame(columns=cols)
    group = list(zip(*(df[k] for k in keys), strict=True))
    _, s_max, order = aggregate(None, df["probability"], group, how="max")
    _, s_mean, _ = aggregate(None, df["probability"], group, how="mean")
    by = {(k if isinstance(k, tuple) else (k,)): g for k, g in df.groupby(keys, sort=False)}
    rows = []
    for key, mx, mean in zip(order, s_max, s_mean, strict=True):
        g = by[tuple(key)]
        row = {**dict(zip(keys, key, strict=True)), "patient_key": g["patient_key"].iloc[0], "n_images": len(g),
               "views": ",".join(sorted(set(g["view"].dropna()))), "image_ids": sorted(g["image_id"]),
               "probability_max": float(mx), "probability_mean": float(mean), "predicted_max": int(mx >= threshold),
               "predicted_mean": int(mean >= threshold),
               "label": int(g["label"].max()) if (g["label"] >= 0).all() else -1}
        if "laterality" not in keys:
            row["breasts"] = ",".join(sorted(set(g["laterality"].dropna())))
        rows.append(row)
    return pd.DataFrame(rows)


def exam_tables(rows: pd.DataFrame, meta: pd.DataFrame, threshold: float
                ) -> tuple[pd.DataFrame, pd.DataFrame, list[dict], dict[str, Any]]:
    """(breasts, exams, conflict error lines, counts) for the scored ``rows`` (image_id,
    source_path, label, probability) and their ``meta``."""
    df = rows[["image_id", "source_path", "label", "probability"]].merge(
        meta.drop_duplicates("image_id"), on="image_id", how="left")
    df["label"] = df["label"].fillna(-1).astype(int)
    no_exam = df["exam_key"].isna()
    grouped = df[~no_exam]
    bad, lines = _conflicts(grouped)
    ok = grouped[~grouped["exam_key"].isin(bad)]
    no_lat = ok["laterality"].isna()
    breasts = _table(ok[~no_lat], ["exam_key", "laterality"], threshold)
    exams = _table(ok, ["exam_key"], threshold)
    counts = {
        "images": int(len(df)), "in_exams": int(len(ok)), "exams": int(len(exams)), "breasts": int(len(breasts)),
        # never dropped silently: each image is in an exam row, or counted here as image-level only
        "image_level_only": {"no_exam_or_patient": int(no_exam.sum()), "metadata_conflict": len(lines),
                             "no_laterality (exam table only)": int(no_lat.sum())},
        "exams_keyed_by_patient": int(ok["exam_key"].str.startswith("p-").groupby(ok["exam_key"]).first().sum())
        if len(ok) else 0,
    }
    assert counts["in_exams"] + int(no_exam.sum()) + len(lines) == len(df), counts
    if len(ok) >= PER_IMAGE_MIN and len(exams) == len(ok):
        # CBIS-style headers: a PatientID and a StudyInstanceUID per image
        counts["warning"] = (f"every one of the {len(ok)} exams holds a single image: the exam keys look per-image "
                             "(CBIS-style StudyInstanceUIDs); give a manifest with patient_id and exam_id columns")
        logger.warning("%s", counts["warning"])
    return breasts, exams, lines, counts


def fill_meta(out: str, records: list[dict], rows: pd.DataFrame, writer: MetaWriter) -> int:
    """Meta rows for scored images that have none: a driver killed between a batch's commit and
    its own receipt of the batch's status rows never wrote them. Their headers are read again
    (header only) on the driver; a manifest's columns come from the listing. Returns how many."""
    lacking = set(rows["image_id"]) - set(read_parts(out, META, ["image_id"])["image_id"])
    missing = [r for r in records if r["image_id"] in lacking]
    if missing:
        probed = probe_batch(pd.DataFrame({"path": [r["path"] for r in missing]}))
        writer.write(pd.DataFrame([{"image_id": r["image_id"], **{k: r.get(k) or p[k] for k in
                                                                  ("patient_id", "exam_id", "laterality", "view")}}
                                   for r, p in zip(missing, probed.to_dict("records"), strict=True)]))
    return len(missing)


def finish_exams(out: str, rows: pd.DataFrame, threshold: float) -> tuple[list[dict], dict[str, Any]]:
    """``breasts.parquet`` and ``exams.parquet`` from the committed rows and their ``_meta``
    parts (written only when some image has an exam); returns (conflict lines, counts)."""
    meta = read_parts(out, META, [f.name for f in META_SCHEMA])
    breasts, exams, lines, counts = exam_tables(rows, meta, threshold)
    for name, table in (("breasts.parquet", breasts), ("exams.parquet", exams)):
        if len(table):
            write_table(pa.Table.from_pandas(table.reset_index(drop=True), preserve_index=False), mio.join(out, name))
    return lines, counts

