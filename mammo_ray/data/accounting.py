""""Nothing lost": the one check every job ends with. Each input has exactly one result row or
one error line (``inputs == rows + errors``), no image twice, none missing, none unexpected."""
from __future__ import annotations

import logging
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
