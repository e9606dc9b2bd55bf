"""The sweep's report: the paper's table (best trial per backbone x freezing ratio, with the
val AUC's 95% interval), whether the best group is separated from the rest, the AUC against
freezing ratio figure with error bars, and results.csv."""
from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from mammo_ray import io as mio

RESULT_FIELDS = ("trial_id", "backbone", "freeze_ratio", "base_lr", "max_lr", "clr_mode", "status", "epochs_run",
                 "best_epoch", "val_auc", "val_auc_low", "val_auc_high", "val_accuracy", "val_precision", "val_recall",
                 "val_f1", "val_loss", "time_s", "restored", "workers", "placement", "node_id", "gpu_ids", "device", "started_at",
                 "finished_at", "checkpoint")


def is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def group_best(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], float(r["freeze_ratio"])), []).append(r)
    table, best = [], []
    for key in sorted(groups):
        scored = [r for r in groups[key] if r["val_auc"] is not None and not is_nan(r["val_auc"])]
        if not scored:
            table.append({"backbone": key[0], "freeze_ratio": key[1], "trial_id": None})
            continue
        top = max(scored, key=lambda r: r["val_auc"])
        table.append(top)
        best.append(top)
    return table, best


def _cell(x: Any, fmt: str = ".4f") -> str:
    return "n/a" if x is None or is_nan(x) or x == "" else format(float(x), fmt)


def table_markdown(rows: list[dict[str, Any]], overlap: dict[str, Any] | None = None) -> str:
    """The paper's table: per backbone x freezing ratio, the best trial's validation metrics,
    with DeLong's 95% interval of the val AUC, and what the intervals say about the ranking."""
    lines = ["| backbone | freezing ratio | val AUC | 95% CI (DeLong) | accuracy | precision | recall | F1 | LR bounds | trial |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("trial_id") is None:
            lines.append(f"| {r['backbone']} | {r['freeze_ratio']:g} | n/a | | | | | | | no finished trial |")
            continue
        ci = (f"[{_cell(r.get('val_auc_low'), '.3f')}, {_cell(r.get('val_auc_high'), '.3f')}]"
              if r.get("val_auc_low") is not None else "n/a")
        lines.append(f"| {r['backbone']} | {float(r['freeze_ratio']):g} | {_cell(r['val_auc'])} | {ci} | "
                     f"{_cell(r['val_accuracy'])} | {_cell(r['val_precision'])} | {_cell(r['val_recall'])} | "
                     f"{_cell(r['val_f1'])} | {float(r['base_lr']):.1e}-{float(r['max_lr']):.1e} | {r['trial_id']} |")
    text = "\n".join(lines) + "\n"
    if overlap and overlap.get("statement"):
        text += "\n" + overlap["statement"] + "\n"
    return text


def best_vs_rest(table_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which groups' val AUC intervals overlap the best group's: an overlap means the ranking
    between them is within noise, and the sweep summary says so."""
    scored = [r for r in table_rows if r.get("trial_id") is not None and r.get("val_auc") is not None
              and not is_nan(r["val_auc"])]
    if len(scored) < 2:
        return None
    top = max(scored, key=lambda r: r["val_auc"])
    name = lambda r: f"{r['backbone']}-r{float(r['freeze_ratio']):g}"  # noqa: E731
    rest = [r for r in scored if r is not top]
    if top.get("val_auc_low") is None or any(r.get("val_auc_high") is None for r in rest):
        return {"best": name(top), "overlapping": None, "separated": None,
                "statement": "no val AUC interval (one class in val): the ranking cannot be judged"}
    overlapping = [name(r) for r in rest if r["val_auc_high"] >= top["val_auc_low"]]
    separated = [name(r) for r in rest if r["val_auc_high"] < top["val_auc_low"]]
    if overlapping:
        statement = (f"The best group, {name(top)} (val AUC {top['val_auc']:.3f} [{top['val_auc_low']:.3f}, "
                     f"{top['val_auc_high']:.3f}]), overlaps {len(overlapping)} of the other {len(rest)} groups' 95% "
                     f"intervals ({', '.join(overlapping)}): their ranking is within noise.")
    else:
        statement = (f"The best group, {name(top)} (val AUC {top['val_auc']:.3f} [{top['val_auc_low']:.3f}, "
                     f"{top['val_auc_high']:.3f}]), is separated from every other group's 95% interval.")
    return {"best": name(top), "overlapping": overlapping, "separated": separated, "statement": statement}


def write_results_csv(path: str, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f for f in RESULT_FIELDS if f != "checkpoint"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    mio.write_bytes(path, buf.getvalue().encode())


def plot_auc_vs_freezing(rows: list[dict[str, Any]], path: str) -> None:
    """Best val AUC per freezing ratio, one line per backbone."""
    import matplotlib  # deferred: only when the figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, _ = group_best(rows)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for backbone in sorted({r["backbone"] for r in table}):
        pts = sorted((float(r["freeze_ratio"]), r["val_auc"], r.get("val_auc_low"), r.get("val_auc_high"))
                     for r in table if r["backbone"] == backbone and r.get("trial_id") is not None
                     and r.get("val_auc") is not None and not is_nan(r["val_auc"]))
        if pts:
            xs, ys, lo, hi = zip(*pts, strict=True)
            # error bars: DeLong's 95% interval (none where it is undefined), so noise is not read as a trend
            err = np.array([[y - (y if a is None else a) for y, a in zip(ys, lo, strict=True)],
                            [(y if b is None else b) - y for y, b in zip(ys, hi, strict=True)]])
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=backbone)
    # a fixed [0.5, 1] axis (widened only for AUCs below chance): zooming to the points' range
    # made a 0.03 spread look like a finding
    low = min([0.5] + [float(r["val_auc_low"]) for r in table if r.get("val_auc_low") is not None])
    ax.set_ylim(max(0.0, low - 0.02), 1.0)
    ax.set_xlabel("freezing ratio")
    ax.set_ylabel("best validation AUC (95% CI, DeLong)")
    ax.set_title("Validation AUC against freezing ratio")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    mio.write_bytes(path, buf.getvalue())
