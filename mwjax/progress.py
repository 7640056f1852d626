"""Progress of long loops (loading, perplexity, lm-eval requests, statistics) that shows wherever the output
goes: a tqdm bar that stays on screen on a terminal; elsewhere (SLURM logs, nohup, `| tee`), where a bar's
carriage returns garble the file, a plain line every `interval` seconds and one at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm


class LineProgress:
    """tqdm's update / set_postfix / close, printed as whole lines: 'loading x.gguf: 120/272 (44%), 31s, ETA 39s'."""

    def __init__(self, total: int, desc: str, stream, interval: float):
        self.total, self.desc, self.stream, self.interval = total, desc, stream, interval
        self.n, self.start = 0, time.monotonic()
        self._last = self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def set_postfix(self, *args, **kwargs) -> None:  # the lines carry the count alone
        pass

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        share = self.n / self.total if self.total else 1.0
        eta = f", ETA {elapsed / share - elapsed:.0f}s" if 0 < share < 1 else ""
        print(f"{self.desc}: {self.n}/{self.total} ({share:.0%}), {elapsed:.0f}s{eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.n and time.monotonic() - self.start >= self.interval:  # a short loop stays quiet
            self._print(time.monotonic())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, *, enabled: bool = True, stream=None, interval: float = 30.0):
    """A progress display for `total` steps (`.update()`, `.close()`, a context manager)."""
    stream = stream or sys.stderr
    if not enabled or not stream.isatty():
        return LineProgress(total, desc, stream, interval if enabled else float("inf"))
    return tqdm(total=total, desc=desc, file=stream, leave=True, dynamic_ncols=True)


def track(iterable: Iterable, total: int, desc: str, *, enabled: bool = True) -> Iterator:
    """Iterate `iterable` with a `progress` display."""
    with progress(total, desc, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()
