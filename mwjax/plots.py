"""Figures of the papers, drawn with matplotlib (Agg backend: files, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

DPI = 200  # raster figures (png); pdf and svg are vector


def layer_magnitudes(stats: Mapping[str, np.ndarray], title: str, path: str | Path) -> Path:
    """House of Cards Figure 3(b, c) / thesis Figure 4.4: top-k and median |value| per layer (1-based axis).

    stats: {"top": [L, k], "median": [L]} magnitudes.
    """
    top, median = np.asarray(stats["top"]), np.asarray(stats["median"])
    layers = np.arange(1, len(median) + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i in range(top.shape[1]):
        ax.plot(layers, top[:, i], marker="o", ms=3, label=f"top {i + 1}")
    ax.plot(layers, median, marker="s", ms=3, color="gray", label="median")
    return _finish(fig, ax, title, "layer (1-based)", "|value|", path)


def magnitudes_3d(values: np.ndarray, token_labels: Sequence[str], title: str, path: str | Path,
                  max_dims: int | None = None) -> Path:
    """Thesis Figure 4.1-style 3D bars: |hidden state| over tokens x feature dimensions at one layer.

    values: [seq, dim]. The largest dimensions are labelled; `max_dims` keeps only the dims with the
    largest magnitude (all by default).
    """
    mag = np.abs(np.asarray(values, np.float64))
    dims = np.arange(mag.shape[1])
    if max_dims is not None and max_dims < mag.shape[1]:
        dims = np.sort(np.argsort(mag.max(0))[-max_dims:])
        mag = mag[:, dims]
    fig = plt.figure(figsize=(8, 5))
    ax = fig.add_subplot(projection="3d")
    xs, ys = np.meshgrid(np.arange(len(dims)), np.arange(mag.shape[0]))
    ax.bar3d(xs.ravel(), ys.ravel(), np.zeros(xs.size), 0.8, 0.8, mag.ravel(), shade=True)
    ax.set_yticks(np.arange(mag.shape[0]))
    ax.set_yticklabels(token_labels, fontsize=6)
    # the largest dims named on the axis itself (a label in the plot would sit on a bar)
    top = np.sort(np.argsort(mag.max(0))[-2:])
    ax.set_xticks(top)
    ax.set_xticklabels([f"dim {dims[d]}" for d in top], fontsize=7)
    ax.set_xlabel("feature dimension")
    ax.set_zlabel("|value|")
    ax.set_title(title)
    return _save(fig, path)


def k_sweep(ks: Sequence[int], series: Mapping[str, Sequence[float]], title: str, path: str | Path,
            ylabel: str = "perplexity", log_y: bool = True) -> Path:
    """House of Cards Figure 4: a metric against k for each attack (perplexity on a log axis; the paper's
    mean zero-shot accuracy with log_y=False)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        ax.plot(list(ks), list(ys), marker="o", ms=4, label=name)
    return _finish(fig, ax, title, "k", ylabel, path, log_y=log_y)


def scaling_curve(factors: Sequence[float], values: Sequence[float], title: str, path: str | Path,
                  ylabel: str = "perplexity") -> Path:
    """The Super Weight Figure 8: a metric against the super weight's scaling factor."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(list(factors), list(values), marker="o")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    return _finish(fig, ax, title, "super weight scaling factor", ylabel, path, log_y=False, legend=False)


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, path: str | Path | None, *, log_y: bool = True,
            legend: bool = True) -> Path | None:
    """Axis labels, title, legend, log y; saves the figure to `path` (None: a panel, the caller saves)."""
    if log_y:
        ax.set_yscale("log")
        # plain numbers ("20", not "2x10^1"); minor ticks labelled only when the axis spans under a decade
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if high / max(low, 1e-300) < 10 else ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    if path is None:
        return None
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # the format follows the suffix: .png, .pdf, .svg
    plt.close(fig)
    return path


def token_label(tokenizer, token_id: int) -> str:
    """A token as a reader reads it: decoded ("cold", not BPE's "Ġcold"), with whitespace made visible."""
    text = tokenizer.decode([int(token_id)])
    return text.strip() or repr(text)


def bos_profile(profile: Mapping[str, np.ndarray], title: str, path_of) -> list[Path]:
    """House of Cards Figure 3(b, c): the top-3 and median |value| per layer of the hidden and intermediate
    states for the first token alone (`mwjax.massive.first_token_profile`); `path_of(name)` names each file."""
    return [layer_magnitudes({"top": np.abs(profile[f"{point}_top"]), "median": profile[f"{point}_median"]},
                             f"{title}: {point} state, first token alone", path_of(f"bos_{point}"))
            for point in ("hidden", "intermediate")]


def grouped_bars(values: Mapping[str, Sequence[float]], title: str, path: str | Path) -> Path:
    """House of Cards Figure 3(a): one group of bars per layer (1-based), one bar per state (log y)."""
    names = list(values)
    n_layers = len(next(iter(values.values())))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, name in enumerate(names):
        ax.bar(np.arange(n_layers) + i * width, values[name], width, label=name)
    ax.set_xticks(np.arange(n_layers) + 0.4 - width / 2)
    ax.set_xticklabels([str(i + 1) for i in range(n_layers)])
    return _finish(fig, ax, title, "layer (1-based)", "max |value|", path)


def pruning_summary(labels: Sequence[str], perplexities: Mapping[str, Sequence[float]], dense: float,
                    removed: Sequence[float], retained: Sequence[float], title: str, path: str | Path) -> Path:
    """Pruning (Wanda / magnitude) against the massive weights, two panels over the same settings `labels`
    ("wanda 50%", "magnitude 2:4", ...): left, perplexity per protection setting (bars, log y) with the dense
    model's as a dashed line (thesis Table 3.3's comparison); right, without protection, the fraction of the
    top-k massive rows' entries pruned and the first token's top-1 massive intermediate value left (pruned /
    dense)."""
    x = np.arange(len(labels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(perplexities), 1)
    for i, (name, ys) in enumerate(perplexities.items()):
        bars = left.bar(x + (i - (len(perplexities) - 1) / 2) * width, ys, width, label=name)
        left.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=6)
    left.axhline(dense, color="gray", ls="--", lw=0.8, label=f"dense {dense:.2f}")
    left.set_xticks(x)
    left.set_xticklabels(labels, fontsize=8)
    _finish(fig, left, "perplexity", "", "perplexity", path=None)
    width = 0.38
    right.bar(x - width / 2, removed, width, label="top-k massive-row entries pruned")
    right.bar(x + width / 2, retained, width, label="bos massive value left (pruned / dense)")
    right.axhline(1.0, color="gray", lw=0.6)
    right.set_ylim(0, 1.4 * max(1.0, *removed, *retained))  # room for the legend above the bars
    right.set_xticks(x)
    right.set_xticklabels(labels, fontsize=8)
    _finish(fig, right, "massive weights, no protection", "", "fraction", path=None, log_y=False, legend=False)
    right.legend(fontsize=7, loc="upper center")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
