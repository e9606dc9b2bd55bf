"""``report.md`` and a self-contained ``report.html`` (figures embedded as data URIs)."""
from __future__ import annotations

import base64
import html
from typing import Any

from mammo_ray import io as mio
from mammo_ray.evaluate import plots

TABLE_METRICS = (("roc_auc", "AUC"), ("accuracy", "accuracy"), ("precision", "precision"), ("recall", "sensitivity"),
                 ("specificity", "specificity"), ("f1", "F1"), ("pr_auc", "PR AUC"),
                 ("sensitivity_at_90_specificity", "sens@90%spec"), ("ece", "ECE"), ("brier", "Brier"))


def _fmt(res: dict[str, Any] | None, key: str) -> str:
    if not res or res.get("metrics") is None:
        return "n/a"
    value = res["metrics"].get(key)
    if value is None:
        return "n/a"
    ci = (res.get("ci") or {}).get(key) or {}
    mark = " (unreliable: small n)" if res.get("small_sample") else ""
    if ci.get("low") is not None and ci.get("high") is not None:
        return f"{value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]{mark}"
    return f"{value:.3f}{mark}"


def _ratio(ck: dict[str, Any]) -> str:
    """A checkpoint's freezing ratio; an ensemble of several ratios has none ("mixed")."""
    return "mixed" if ck.get("freeze_ratio") is None else f"{ck['freeze_ratio']:g}"


def _plain_epoch(ck: dict[str, Any]) -> str:
    return "n/a (an ensemble)" if ck.get("epoch") is None else str(ck["epoch"])


def _plain(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _val_auc(ck: dict[str, Any]) -> float | None:
    value = (ck.get("train_metrics") or {}).get("val_auc")
    return None if value is None or value != value else float(value)  # NaN: undefined


def chosen_by_val(report: dict[str, Any]) -> str | None:
    """The tag of the checkpoint with the best val AUC: the one to report (test never chooses)."""
    scored = [(v, ck["tag"]) for ck in report["checkpoints"] if (v := _val_auc(ck)) is not None]
    return max(scored)[1] if scored else None


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per checkpoint x set, sorted by backbone then freezing ratio; the checkpoint
    chosen by val AUC is starred. The first column is the checkpoint's tag (its scores folder):
    two sweeps' groups of one backbone and ratio (pretrained and random init) are two rows."""
    chosen = chosen_by_val(report)
    rows = []
    def order(c: dict[str, Any]) -> tuple:
        return c["backbone"], -1.0 if c["freeze_ratio"] is None else float(c["freeze_ratio"]), c["tag"]

    for ck in sorted(report["checkpoints"], key=order):
        for name, res in ck["sets"].items():
            rows.append([ck["tag"], ck["backbone"] + (" *" if ck["tag"] == chosen else ""), _ratio(ck),
                         _plain(_val_auc(ck)), name, str(res.get("n", "")),
                         *[_fmt(res, k) for k, _ in TABLE_METRICS]])
    return rows


COMPARISON_HEADER = ["chosen", "other", "set", "n", "AUC difference [95% CI]", "resampled", "DeLong p"]
COMPARISON_NOTE = ("AUC of the checkpoint chosen on val minus each other checkpoint's, on the same images: 95% paired "
                   "bootstrap interval (both models scored on every replicate's draw) and the paired DeLong test "
                   "(clustered by patient when patient ids exist, Obuchowski 1997). "
                   "Overlapping per-model intervals do not mean no difference; these intervals say it.")


def comparison_rows(comparisons: list[dict[str, Any]]) -> list[list[str]]:
    """The paired AUC differences (chosen minus each other checkpoint), one row per pair and set."""
    rows = []
    for c in comparisons:
        if c.get("reason"):
            rows.append([c["chosen"], c["other"], c["set"], str(c["n"]), f"n/a: {c['reason']}", "", ""])
            continue
        ci = "" if c["low"] is None else f" [{c['low']:+.3f}, {c['high']:+.3f}]"
        rows.append([c["chosen"], c["other"], c["set"], str(c["n"]), f"{c['delta']:+.3f}{ci}", c["resampled"],
                     "n/a" if c["delong_p"] is None else f"{c['delong_p']:.3g}"])
    return rows


def console_summary(report: dict[str, Any]) -> list[str]:
    """The console's short summary: one line per checkpoint and set (AUC with its interval,
    sensitivity and specificity at the val threshold), the val-chosen checkpoint starred, and
    each paired comparison in one line. The full table stays in ``report.md``/``report.html``."""
    chosen = chosen_by_val(report)
    lines = []
    for ck in report["checkpoints"]:
        head = f"{'*' if ck['tag'] == chosen else ' '} {ck['tag']} (val AUC {_plain(_val_auc(ck))})"
        for name, res in ck["sets"].items():
            if res.get("metrics") is None:
                lines.append(f"{head} {name}: n/a ({res.get('reason')})")
                continue
            m = res["metrics"]
            lines.append(f"{head} {name} n={res.get('n', '')}: AUC {_fmt(res, 'roc_auc')}, sensitivity "
                         f"{_plain(m.get('recall'))}, specificity {_plain(m.get('specificity'))}")
    for row in comparison_rows(report.get("comparisons") or []):
        lines.append(f"  {row[0]} minus {row[1]} on {row[2]}: {row[4]}" + (f" (DeLong p {row[6]})" if row[6] else ""))
    return lines


def figure_names(ck: dict[str, Any]) -> list[str]:
    """A checkpoint's figure files (by exact name: tag ``g-2`` must not claim tag ``g``'s)."""
    tag, scored = ck["tag"], [n for n, r in ck["sets"].items() if r.get("metrics") is not None]
    if not scored:
        return []
    return [f"{tag}-roc.png", f"{tag}-pr.png", f"{tag}-reliability.png", *(f"{tag}-{n}-confusion.png" for n in scored)]


def figures(report: dict[str, Any]) -> dict[str, bytes]:
    out = {}
    for ck in report["checkpoints"]:
        scored = {n: r for n, r in ck["sets"].items() if r.get("metrics") is not None}
        tag = ck["tag"]
        if scored:
            out[f"{tag}-roc.png"] = plots.roc_figure(scored, f"ROC: {tag}")
            out[f"{tag}-pr.png"] = plots.pr_figure(scored, f"Precision-recall: {tag}")
            out[f"{tag}-reliability.png"] = plots.reliability_figure(scored, f"Reliability: {tag}")
        for name, res in scored.items():
            out[f"{tag}-{name}-confusion.png"] = plots.confusion_figure(res["confusion"], f"{name} @ {ck['threshold']['threshold']:.3f}")
    return out


def _tta_note(report: dict[str, Any], quote: str) -> str:
    tta = report.get("tta", "none")
    return "" if tta == "none" else (f" Test-time augmentation {quote}{tta}{quote}: every image's probability "
                                     "(val included) is the mean over its flipped views.")


def write_report(report: dict[str, Any], out: str) -> None:
    figs = figures(report)
    for name, data in figs.items():
        mio.write_bytes(mio.join(out, "figures", name), data)
    header = ["checkpoint", "backbone", "freezing", "val AUC", "set", "n", *[label for _, label in TABLE_METRICS]]
    rows = table_rows(report)
    md = ["# Evaluation report", "",
          "Values are point estimates with 95% bootstrap confidence intervals "
          "(patients resampled when patient ids exist). The decision threshold of each checkpoint "
          "was chosen on the validation split and applied unchanged to every set. * marks the checkpoint "
          "with the best val AUC, the one to report: test never chooses." + _tta_note(report, "`"), "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    pairs = comparison_rows(report.get("comparisons") or [])
    if pairs:
        md += ["", "## Paired comparisons", "", COMPARISON_NOTE, "", "| " + " | ".join(COMPARISON_HEADER) + " |",
               "|" + "---|" * len(COMPARISON_HEADER)] + ["| " + " | ".join(r) + " |" for r in pairs]
    for ck in report["checkpoints"]:
        t = ck["threshold"]
        md += ["", f"## {ck['tag']}", "",
               f"- checkpoint: `{ck['checkpoint']}` ({ck['backbone']}, freezing ratio {_ratio(ck)}, epoch {_plain_epoch(ck)})",
               f"- threshold: {t['threshold']:.4f} ({t['method']}, chosen on val, n={t['n_val']})"
               + (f"; {t['reason']}" if t.get("reason") else ""),
               f"- preprocessing spec (from the checkpoint): `{ck['spec']}`"]
        for name, res in ck["sets"].items():
            md.append(f"- {name}: {res.get('how')} ({res.get('source')}, split {res.get('split')})")
            if res.get("metrics") is None:
                md.append(f"  - metrics skipped: {res.get('reason')}")
            for key in ("small_sample", "grouping_warning"):
                if res.get(key):
                    md.append(f"  - {res[key]}")
            for metric, reason in (res.get("undefined") or {}).items():
                md.append(f"  - {metric} undefined: {reason}")
            for level, m in (res.get("aggregated") or {}).items():
                auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
                md.append(f"  - {level.replace('_', '-level, ')} over views: AUC {auc}, "
                          f"sensitivity {_plain(m.get('recall'))}, specificity {_plain(m.get('specificity'))}")
        for note in ck.get("notes", []):
            md.append(f"- note: {note}")
        for name in figure_names(ck):
            md.append(f"![{name}](figures/{name})")
    mio.write_bytes(mio.join(out, "report.md"), ("\n".join(md) + "\n").encode())
    mio.write_bytes(mio.join(out, "report.html"), render_html(report, header, rows, figs).encode())


def render_html(report: dict[str, Any], header: list[str], rows: list[list[str]], figs: dict[str, bytes]) -> str:
    esc = html.escape
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>mammo_ray evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}"
             "img{max-width:480px;margin:6px}</style></head><body>",
             "<h1>Evaluation report</h1>",
             "<p>95% bootstrap confidence intervals (patients resampled when patient ids exist); "
             "thresholds chosen on validation, never on test; * marks the checkpoint with the best val AUC."
             + html.escape(_tta_note(report, "")) + "</p>",
             "<table id='paper-table'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table>")
    pairs = comparison_rows(report.get("comparisons") or [])
    if pairs:
        parts += [f"<h2>Paired comparisons</h2><p>{esc(COMPARISON_NOTE)}</p><table id='comparisons'><tr>"
                  + "".join(f"<th>{esc(h)}</th>" for h in COMPARISON_HEADER) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in pairs]
        parts.append("</table>")
    for ck in report["checkpoints"]:
        t = ck["threshold"]
        parts.append(f"<h2>{esc(ck['tag'])}</h2><ul><li>checkpoint <code>{esc(ck['checkpoint'])}</code>, "
                     f"{esc(ck['backbone'])}, freezing ratio {_ratio(ck)}, epoch {_plain_epoch(ck)}</li>"
                     f"<li>threshold {t['threshold']:.4f} ({esc(t['method'])}, chosen on val)</li>"
                     f"<li>spec <code>{esc(str(ck['spec']))}</code></li>")
        for name, res in ck["sets"].items():
            parts.append(f"<li>{esc(name)}: {esc(str(res.get('how')))}"
                         + (f" &mdash; metrics skipped: {esc(str(res.get('reason')))}" if res.get("metrics") is None else "")
                         + "</li>")
        parts.append("</ul><div>")
        for name in figure_names(ck):
            b64 = base64.b64encode(figs[name]).decode()
            parts.append(f"<img alt='{esc(name)}' src='data:image/png;base64,{b64}'>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
