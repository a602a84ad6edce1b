"""Progress a person sees: a bar where the output is a terminal, a line every so often where it is a
log (a Ray job's, a file's, a pipe's), where a bar's carriage returns would pile up.

    progress = Progress("eval: encoded studies", total=95)
    for done in ...:
        progress.update(done, "4.1 studies/s")
    progress.close()
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

LINE_SECONDS = 10.0   # in a log: at most one line per this many seconds, the first and the last always


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """``what`` done of ``total``: a tqdm bar on ``stream`` (stderr by default) when it is a terminal, else
    lines ``what 40/95 (42%)  NOTE  elapsed 0m31s  ETA 0m43s``."""

    def __init__(self, what: str, total: int, *, stream: TextIO | None = None, unit: str = "it",
                 every_s: float = LINE_SECONDS) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.stream = sys.stderr if stream is None else stream
        self.started = time.monotonic()
        self.printed: float | None = None
        self.done = self.printed_done = 0
        self.note = ""
        self.bar = None
        if is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, done: int, note: str = "") -> None:
        """``done`` so far (not an increment); ``note`` rides along (a loss, a rate)."""
        self.done, self.note = done, note
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if note:
                self.bar.set_postfix_str(note)
            return
        now = time.monotonic()
        if self.printed is None or done >= self.total or now - self.printed >= self.every_s:
            self._print_line(now)

    def _print_line(self, now: float) -> None:
        self.printed, self.printed_done = now, self.done
        self.stream.write(self._line(now - self.started) + "\n")
        self.stream.flush()

    def _line(self, elapsed: float) -> str:
        done = self.done
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        eta = elapsed / done * (self.total - done) if done else float("nan")
        parts = [f"{self.what} {done}/{self.total}{share}", self.note, f"elapsed {duration(elapsed)}",
                 f"ETA {duration(eta)}"]
        return "  ".join(part for part in parts if part)

    def write(self, line: str) -> None:
        """A line of its own (a checkpoint, a warning): above the bar in a terminal."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """The bar left as it ended; in a log, a last line unless the last one said it already (fewer done than
        ``total`` where some could not be read)."""
        if self.bar is not None:
            self.bar.close()
        elif self.printed is None or self.printed_done != self.done:
            self._print_line(time.monotonic())


def duration(seconds: float) -> str:
    """``1m05s``, ``2h03m``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
