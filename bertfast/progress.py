"""The one progress line of bertfast's long jobs (``SentenceEncoder.encode`` of many texts,
``bertfast encode --input``, ``bertfast finetune``), on stderr, without dependencies.

On a terminal it is one line redrawn in place.  In a log file or a pipe it is plain lines: one
at each tenth of the work and at least one every :data:`INTERVAL` seconds while work goes on,
so a long run shows it is alive in its log however the work is cut.

    >>> bar = Progress(10_000, "encoding corpus.txt", unit="rows")
    >>> bar.update(256)   # after each slice of work
    >>> bar.close()       # the last line
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, Sequence

__all__ = ["Progress", "THRESHOLD", "INTERVAL"]

THRESHOLD = 256  # show=None shows the line when more than this many units are to be done
INTERVAL = 30.0  # at most this many seconds between two lines in a log (not a terminal)
REDRAW = 0.1  # at most one redraw per this many seconds on a terminal


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


class Progress:
    """Progress of ``total`` units of work (rows, texts, batches) on ``stream`` (stderr).

    The line: ``DESC: DONE/TOTAL UNIT (PCT%)[, loss L], RATE UNIT/s, ELAPSED[, ETA T]``.
    ``done``: units already done before this run (a resumed job): they count in DONE, not in
    the rate or the ETA, which measure this run only.  ``rates``: names of other counters
    (e.g. ``("examples", "tokens")``), attributes of the bar that start at 0 and that the caller
    adds to; they are shown as per-second rates in place of the unit's.  ``loss``: set by the
    caller, shown when it is a finite number.

    ``show``: True always, False never (every method still works), None when more than
    :data:`THRESHOLD` units are left to do.  On a terminal: one line redrawn in place (at most
    every :data:`REDRAW` seconds, and when the work is done), ended by :meth:`close`.  Elsewhere
    (a log file, a pipe): a plain line when the work passes a tenth of the total (the first
    update included) or when ``interval`` seconds (default :data:`INTERVAL`) have passed since the
    last line, and at :meth:`close` a last line when the last one written is out of date."""

    def __init__(self, total: int, desc: str, *, unit: str = "rows", done: int = 0, show: Optional[bool] = None,
                 stream=None, interval: Optional[float] = None, rates: Sequence[str] = ()) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self._done0 = int(done)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = INTERVAL if interval is None else float(interval)
        todo = self.total - self.done
        self.show = bool(todo > THRESHOLD if show is None else show) and todo > 0
        self.rates = tuple(rates)
        for name in self.rates:
            setattr(self, name, 0)
        self.loss = float("nan")
        self.lines = 0  # lines (or redraws) written
        self.start = self.last = time.perf_counter()
        self._decile = -1  # the tenth of the work of the last line in a log
        self._written = None  # ``done`` at the last line written
        self._width = 0  # the length of the line on the terminal, to overwrite all of it

    # -- the line
    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({pct:3.0f}%)"]
        if isinstance(self.loss, (int, float)) and math.isfinite(self.loss):
            parts.append(f"loss {self.loss:.4f}")
        per_s = (lambda n: n / elapsed) if elapsed > 0 else (lambda n: 0.0)
        if self.rates:
            parts.extend(f"{_rate(per_s(getattr(self, name)))} {name}/s" for name in self.rates)
        else:
            parts.append(f"{_rate(per_s(self.done - self._done0))} {self.unit}/s")
        parts.append(_clock(elapsed))
        speed = per_s(self.done - self._done0)
        if speed > 0 and self.done < self.total:
            parts.append(f"ETA {_clock((self.total - self.done) / speed)}")
        return ", ".join(parts)

    def _write(self, end: str) -> None:
        line = self._line()
        if self.tty:
            line, self._width = "\r" + line.ljust(self._width), max(self._width, len(line))
        self.stream.write(line + end)
        self.stream.flush()
        self.lines += 1
        self.last = time.perf_counter()
        self._written = self.done

    # -- the caller's
    def update(self, n: int = 0) -> None:
        """``n`` more units done; redraw / write a line when it is time to."""
        self.done += n
        if not self.show:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self.last >= REDRAW or self.done >= self.total or not self.lines:
                self._write("")
            return
        decile = min(10, 10 * self.done // self.total) if self.total > 0 else 10
        if self.done != self._written and (decile > self._decile or now - self.last >= self.interval):
            self._decile = max(decile, self._decile)
            self._write("\n")

    def close(self) -> None:
        """End the line: on a terminal the final state and a newline; in a log a last line when
        any was written and the last one is out of date."""
        if not self.show:
            return
        if self.tty:
            self._write("\n")
        elif self.lines and self._written != self.done:
            self._write("\n")
