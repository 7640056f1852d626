"""Figures are written atomically, in the format their suffix names."""

import matplotlib.pyplot as plt
import pytest

from mwjax.experiments import plots


@pytest.mark.parametrize("suffix, magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_figures_appear_whole_in_their_format(tmp_path, suffix, magic):
    path = plots.k_sweep([0, 1, 2], {"zeroing": [1.0, 2.0, 4.0]}, "t", tmp_path / f"sweep.{suffix}")
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"sweep.{suffix}"]


def test_a_failed_save_leaves_the_old_figure(tmp_path, monkeypatch):
    path = plots.k_sweep([0, 1], {"zeroing": [1.0, 2.0]}, "t", tmp_path / "sweep.png")
    before = path.read_bytes()

    def fail(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"half a fig")
        raise OSError("disk full")

    monkeypatch.setattr(plt.Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        plots.k_sweep([0, 1], {"zeroing": [3.0, 5.0]}, "t", path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


@pytest.mark.parametrize("ys", [[14.7, 15.6, 33.1, 49.05], [0.57, 0.9, 3.2], [14.7, 32.8, 1.1e7], [1.0, 2.0, 4.0]])
def test_a_log_axis_labels_a_value_at_or_beyond_each_end_of_the_data(ys):
    """House of Cards Figure 4's sweep spans 14.7-49: its lowest points once sat below the lowest label (20)."""
    fig, ax = plt.subplots()
    ax.plot(range(len(ys)), ys)
    plots._log_axis(ax)  # what every log-scale figure (k_sweep, scaling_curve) goes through
    fig.canvas.draw()
    low, high = ax.get_ylim()
    labelled = [t.get_loc() for t in ax.yaxis.get_major_ticks() if t.label1.get_text() and low <= t.get_loc() <= high]
    assert min(labelled) <= min(ys) and max(labelled) >= max(ys), (labelled, (low, high))
    texts = [t.label1.get_text() for t in ax.yaxis.get_major_ticks() if t.label1.get_text()]
    assert all(text.replace(".", "").replace("e+", "").isdigit() for text in texts), texts  # "20", not "2x10^1"
    plt.close(fig)
