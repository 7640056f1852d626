"""Progress off a terminal is whole lines (a SLURM log stays readable); on a terminal a tqdm bar that stays."""

import io

from tqdm.auto import tqdm

from mwjax.core.progress import progress, track


def test_off_a_terminal_progress_is_whole_lines():
    stream = io.StringIO()
    with progress(4, "loading m.gguf", stream=stream, interval=0.0) as bar:
        for _ in range(4):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("loading m.gguf: 1/4 (25%), 0s, ETA ")
    assert lines[3].startswith("loading m.gguf: 4/4 (100%)")
    assert "\r" not in stream.getvalue()
    quiet = io.StringIO()
    assert list(track(range(3), 3, "x", enabled=False)) == [0, 1, 2]
    with progress(2, "x", stream=quiet, enabled=False) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""


def test_on_a_terminal_a_bar_that_stays():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress(3, "perplexity", stream=Terminal())
    assert isinstance(bar, tqdm) and bar.leave
    bar.close()


def test_a_line_is_not_repeated_at_close():
    stream = io.StringIO()
    bar = progress(2, "slow", stream=stream, interval=0.0)
    bar.update()
    bar.update()
    bar.close()  # the count was printed by the last update already
    assert stream.getvalue().splitlines() == ["slow: 1/2 (50%), 0s, ETA 0s", "slow: 2/2 (100%), 0s"]
