""""Nothing lost": the checks every job starts and ends with, in one place for every job.

- :func:`check_listed`: inputs that list nothing (an empty folder, a header-only manifest, a
  manifest of blank rows) are refused before any work.
- :func:`finish_job`: the refusals' top reasons on the console, then each input has exactly one
  result row or one error line (``inputs == rows + errors``; no image twice, none missing, none
  unexpected), then a job that wrote no row fails (a run that produces nothing must not exit 0).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from mammo_ray.resources import TASK_RETRIES

#: the error line of an input whose Ray task failed every retry
LOST_REASON = (f"its Ray task failed (a dying worker, e.g. killed for memory, is retried {TASK_RETRIES} times; "
               "an error in the task is in the Ray logs)")


@dataclass(frozen=True)
class Tally:
    """A job's accounting: ``inputs`` counted while listing, ``rows`` and ``errors`` at the end."""

    inputs: int
    rows: int
    errors: int
    duplicates: int = 0
    in_both: int = 0
    missing: int = 0
    unexpected: int = 0

    @property
    def balanced(self) -> bool:
        return self.inputs == self.rows + self.errors and not (self.duplicates or self.in_both or self.missing
                                                               or self.unexpected)

    @property
    def line(self) -> str:
        return f"inputs={self.inputs} rows={self.rows} errors={self.errors}"


def tally(inputs: int, expected: Iterable[str], row_ids: Iterable[str], error_ids: Iterable[str],
          listing_errors: int = 0) -> Tally:
    """Count a job's results against its listed inputs.

    Args:
        inputs: every input the listing saw (including those refused while listing).
        expected: image ids of the inputs the job processed.
        row_ids / error_ids: image ids of the result rows and of the error lines of those inputs.
        listing_errors: error lines written while listing (they have no processed image id).
    """
    rows, errs = list(row_ids), list(error_ids)
    dup = sum(n - 1 for n in Counter(rows).values()) + sum(n - 1 for n in Counter(errs).values())
    got, want = set(rows) | set(errs), set(expected)
    return Tally(inputs=inputs, rows=len(rows), errors=listing_errors + len(errs), duplicates=dup,
                 in_both=len(set(rows) & set(errs)), missing=len(want - got), unexpected=len(got - want))


def check_nothing_lost(t: Tally, logger: logging.Logger) -> None:
    """Log the balanced accounting, or raise naming what is off.

    Raises:
        RuntimeError: the accounting does not balance.
    """
    if not t.balanced:
        raise RuntimeError(f"nothing-lost check failed: {t.line}; duplicates={t.duplicates} in_both={t.in_both} "
                           f"missing={t.missing} unexpected={t.unexpected}")
    logger.info("nothing lost: %s", t.line)


#: the reasons the console shows when a job refuses inputs (the rest: errors.csv)
TOP_REASONS = 3
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")
_SIZE = re.compile(r"\b\d+x\d+\b")
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\dxX])")


class NoRowsError(RuntimeError):
    """A job that wrote no row: every input was refused. One line on the console (the top
    reasons are logged just before), exit status 1."""

    user_facing = True


def reason_kind(reason: str) -> str:
    """A reason without its per-file details (quoted values, numbers, sizes), so that 200 files
    refused for one cause count as one kind: ``manifest path '...' not found`` for every path."""
    text = _QUOTED.sub("'…'", str(reason))
    text = _HEX.sub("0x…", text)
    text = _SIZE.sub("NxN", text)
    return _NUMBER.sub("N", text)


def refusal_lines(reasons: Iterable[str], inputs: int, *, where: str, top: int = TOP_REASONS) -> list[str]:
    """The console's block for a job's refusals: a head line and the ``top`` most common kinds
    of reason with their counts (a kind with one wording is shown as written); empty when none.

    Args:
        reasons: one reason per refused input.
        inputs: every input the job listed.
        where: the errors.csv the full list is in.
    """
    reasons = [str(r) for r in reasons]
    if not reasons:
        return []
    kinds: dict[str, Counter] = {}
    for r in reasons:
        kinds.setdefault(reason_kind(r), Counter())[r] += 1
    ranked = sorted(kinds.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    lines = [f"refused {len(reasons)} of {inputs} input(s) (each with its reason in {where}):"]
    for kind, wordings in ranked[:top]:
        shown = next(iter(wordings)) if len(wordings) == 1 else kind
        lines.append(f"  {sum(wordings.values())} x {shown}")
    rest = ranked[top:]
    if rest:
        lines.append(f"  {sum(sum(w.values()) for _, w in rest)} more, for {len(rest)} other reason(s)")
    return lines


def check_listed(inputs: int, given: list[str], ignored: dict[str, int] | None = None) -> None:
    """Refuse inputs that list nothing, before any work or output.

    Raises:
        ValueError: naming the inputs, and the non-image files that were ignored.
    """
    if inputs:
        return
    skipped = ", ".join(f"{n} {ext or '(no extension)'}" for ext, n in sorted((ignored or {}).items()))
    raise ValueError(f"no input image in {' '.join(given)}: an empty folder, a manifest without rows, or rows of "
                     f"blank cells{f' (ignored non-image files: {skipped})' if skipped else ''}")


def finish_job(t: Tally, reasons: Iterable[str], logger: logging.Logger, *, where: str) -> None:
    """How every job ends, after its outputs are written: the refusals' top reasons (a warning
    block), the nothing-lost check, and a refusal of a run that wrote no row.

    Args:
        t: the job's tally.
        reasons: the reason of every refused input (listing and processing).
        where: the job's errors.csv.

    Raises:
        RuntimeError: the accounting does not balance.
        NoRowsError: no input gave a row.
    """
    lines = refusal_lines(reasons, t.inputs, where=where)
    if lines:
        logger.warning("%s", "\n".join(lines))
    check_nothing_lost(t, logger)
    if t.rows == 0:
        raise NoRowsError(f"no row written: all {t.inputs} input(s) were refused (the top reasons are above; "
                          f"every one is in {where})")
