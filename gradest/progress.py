"""Progress of long work as lines, which a captured log keeps (a progress bar is hidden off a terminal).

The library logs them to `logging.getLogger("gradest")` at INFO; the `gradest` command prints them on stdout, and
a program that imports gradest sees them only if it configures logging. `Pace` follows a loop of known length: a
line after its first unit when the rest would take a while (what it took, what the rest would take at that pace),
then one whenever `QUIET_SECONDS` pass without a line, so slow work never looks hung and its end can be planned.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("gradest")

QUIET_SECONDS = 30  # the longest a long loop goes without a line


def duration_text(seconds: float) -> str:
    """A time for people: 40 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


class Pace:
    """Remarks on a loop of `total` units begun now (see the module's docstring)."""

    def __init__(self, total: int, unit: str = "steps"):
        self.total, self.unit = total, unit
        self.start = self.last = time.perf_counter()
        self.first = True

    def remark(self, done: int) -> str | None:
        """What to say after `done` units (None: nothing yet); saying it counts as a line."""
        now = time.perf_counter()
        elapsed, left = now - self.start, self.total - done
        rest = left * elapsed / max(done, 1)
        first, self.first = self.first, False
        if first and rest >= QUIET_SECONDS:
            count = "" if done == 1 else f" {done:,}"
            text = f"the first{count} took {elapsed:.1f} s: about {duration_text(rest)} for the rest at that pace"
        elif not first and left and now - self.last >= QUIET_SECONDS:
            text = f"{elapsed:.0f} s elapsed, about {duration_text(rest)} left"
        else:
            return None
        self.last = now
        return text

    def shown(self):
        """Another line was just printed (an evaluation): the quiet time starts again."""
        self.last = time.perf_counter()

    def tick(self, done: int, what: str):
        """Log `what done/total unit: remark` when there is a remark."""
        text = self.remark(done)
        if text:
            log.info(f"{what} {done:,}/{self.total:,} {self.unit}: {text}")
