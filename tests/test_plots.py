"""Figures are written atomically, in the format their suffix names."""

import matplotlib.pyplot as plt
import pytest

from mwjax import plots


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
