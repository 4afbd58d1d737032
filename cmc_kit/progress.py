"""A progress line for loops over samples that need no TensorFlow (validate, synth)."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """`label: done/total samples` on stderr, for loops over samples (no TensorFlow needed).

    On a terminal one line is rewritten in place (at most ~10 times a second); otherwise (a log
    file, a notebook's captured output) a line is printed at each 10% and at the end, so a long
    run adds at most 11 lines to a log. Call it with the number of samples done so far.
    """

    def __init__(self, label: str, total: int, *, stream=None, interactive: bool | None = None,
                 min_interval_s: float = 0.1):
        self.label, self.total = label, int(total)
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.min_interval_s = min_interval_s
        self._last_time = 0.0
        self._last_decile = 0

    def __call__(self, done: int) -> None:
        final = done >= self.total
        if self.interactive:
            now = time.monotonic()
            if not final and now - self._last_time < self.min_interval_s:
                return
            self._last_time = now
            print(f"\r{self.label}: {done}/{self.total} samples", end="\n" if final else "",
                  file=self.stream, flush=True)
            return
        decile = 10 * done // max(self.total, 1)
        if final or decile > self._last_decile:
            self._last_decile = decile
            print(f"{self.label}: {done}/{self.total} samples ({100 * done // max(self.total, 1)}%)",
                  file=self.stream, flush=True)
