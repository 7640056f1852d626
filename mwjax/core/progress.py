"""Progress of long loops (loading, perplexity, lm-eval requests, statistics) that shows wherever the output
goes: a tqdm bar that stays on screen on a terminal; elsewhere (SLURM logs, nohup, `| tee`), where a bar's
carriage returns garble the file, a plain line every `interval` seconds (or a tenth of the time so far, when
that is longer: a minute-long loop reports every 10 s, an hour-long one every 6 minutes) and one at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    """A short human-readable duration: 3725 -> '1h02m', 95 -> '1m35s', 7 -> '7s'.

    Args:
      seconds: the duration (rounded to whole seconds; negative counts as 0).

    Returns:
      The text.
    """
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours}h{rest // 60:02d}m"
    return f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


class LineProgress:
    """tqdm's update / set_postfix / close, printed as whole lines: 'loading x.gguf: 120/272 (44%), 31s, ETA 39s'.

    Args:
      total: the number of steps.
      desc: the label that starts each line.
      stream: where the lines go (a text file).
      interval: the least seconds between lines (a tenth of the time so far when that is longer); 0 prints a
        line every update, inf never prints.
      initial: steps already done (a resumed run); the ETA counts this run's pace only.
    """

    def __init__(self, total: int, desc: str, stream, interval: float, initial: int = 0):
        self.total, self.desc, self.stream, self.interval = total, desc, stream, interval
        self.n = self.initial = initial
        self.start = time.monotonic()
        self._last, self._printed = self.start, initial

    def update(self, n: int = 1) -> None:
        """Count `n` more steps done; print a line if `interval` has passed since the last one.

        Args:
          n: steps done since the last update.
        """
        self.n += n
        now = time.monotonic()
        if now - self._last >= (self.interval and max(self.interval, 0.1 * (now - self.start))):  # 0: every update
            self._last = now
            self._print(now)

    def set_postfix(self, *args, **kwargs) -> None:  # the lines carry the count alone
        """Ignored (tqdm's API): the lines carry the count alone.

        Args:
          args: ignored.
          kwargs: ignored.
        """
        pass

    def _print(self, now: float) -> None:
        self._printed = self.n
        elapsed = now - self.start
        share = self.n / self.total if self.total else 1.0
        done = self.n - self.initial  # this run's steps set the pace
        eta = f", ETA {duration(elapsed / done * (self.total - self.n))}" if done > 0 and share < 1 else ""
        print(f"{self.desc}: {self.n}/{self.total} ({share:.0%}), {duration(elapsed)}{eta}", file=self.stream,
              flush=True)

    def close(self) -> None:
        """Print the final line, unless the loop was short (under `interval`) or this count was printed."""
        # a short loop stays quiet, and a line already printed for this count is not repeated
        if self.n != self._printed and time.monotonic() - self.start >= self.interval:
            self._print(time.monotonic())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, *, enabled: bool = True, stream=None, interval: float = 10.0,
             interactive: bool | None = None, initial: int = 0):
    """A progress display for `total` steps (`.update()`, `.close()`, a context manager).

    Args:
      total: the number of steps.
      desc: the label of the bar / lines.
      enabled: False shows nothing (a `LineProgress` that never prints).
      stream: where it is shown; None for stderr.
      interval: seconds between lines when not interactive (`LineProgress`).
      interactive: a tqdm bar (True) or plain lines (False); None: a bar when `stream` is a terminal.
      initial: steps already done (a resumed run).

    Returns:
      A tqdm bar or a `LineProgress`.
    """
    stream = stream or sys.stderr
    if not enabled or not (stream.isatty() if interactive is None else interactive):
        return LineProgress(total, desc, stream, interval if enabled else float("inf"), initial)
    return tqdm(total=total, initial=initial, desc=desc, file=stream, leave=True, dynamic_ncols=True)


def track(iterable: Iterable, total: int, desc: str, *, enabled: bool = True) -> Iterator:
    """Iterate `iterable` with a `progress` display.

    Args:
      iterable: the items.
      total: how many there are (the display's total).
      desc: the display's label.
      enabled: False shows nothing.

    Yields:
      The items of `iterable`, counting each one done when the next is asked for.
    """
    with progress(total, desc, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()
