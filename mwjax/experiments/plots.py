"""Figures of the papers, drawn with matplotlib (Agg backend: files, no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mwjax.core import atomic, lazy


def _agg_backend() -> None:
    import matplotlib

    matplotlib.use("Agg")


# matplotlib loads with the first figure (Agg backend: files, no display), not with the flags of a command line
plt, patches, ticker = (lazy.module(f"matplotlib.{name}", before=_agg_backend)
                        for name in ("pyplot", "patches", "ticker"))

if TYPE_CHECKING:
    from mwjax.research import massive, super_mechanism

TITLE_WIDTH = 70  # characters per title line: a model name and a layer label still fit a 6-inch figure


def wrapped(title: str) -> str:
    """A title broken into lines that fit the figure (long model paths no longer run off the edge).

    Args:
      title: the title; its whitespace, line breaks included, is re-flowed.

    Returns:
      `title` in lines of at most TITLE_WIDTH characters (`title` itself when it is empty or blank).
    """
    return "\n".join(textwrap.wrap(title, TITLE_WIDTH)) or title


DPI = 200  # raster figures (png); pdf and svg are vector


def _prob_cmap():
    """The colour map of probabilities; masked cells blank."""
    return lazy.module("matplotlib").colormaps["YlGnBu"].with_extremes(bad="white")


def layer_magnitudes(stats: massive.Magnitudes, title: str, path: str | Path) -> Path:
    """House of Cards Figure 3(b, c) / thesis Figure 4.4: top-k and median |value| per layer (1-based axis).

    Args:
      stats: one state's per-layer top-k [L, k] and median [L] |value| (`massive.Magnitudes`).
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.

    Returns:
      `path` as a Path.
    """
    top, median = np.asarray(stats.top), np.asarray(stats.median)
    layers = np.arange(1, len(median) + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i in range(top.shape[1]):
        ax.plot(layers, top[:, i], marker="o", ms=3, label=f"top {i + 1}")
    ax.plot(layers, median, marker="s", ms=3, color="gray", label="median")
    return _finish(fig, ax, title, "layer (1-based)", "|value|", path)


def magnitudes_3d(values: np.ndarray, token_labels: Sequence[str], title: str, path: str | Path,
                  max_dims: int | None = None) -> Path:
    """Thesis Figure 4.1: |hidden state| (z) over tokens (x) and feature dimensions (y) at one layer.

    One line per token, as the Massive Activations code draws it; the two largest dims are named on the feature axis.

    Args:
      values: [seq, dim] hidden state of one sequence (its magnitude is drawn).
      token_labels: [seq] the tokens' labels (`token_label`).
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      max_dims: keep only this many dims, those with the largest magnitude; None for all.

    Returns:
      `path` as a Path.
    """
    fig = plt.figure(figsize=(8, 5))
    ax = fig.add_subplot(projection="3d")
    _magnitude_lines(ax, values, token_labels, max_dims)
    ax.set_title(wrapped(title), fontsize=10)
    return _save(fig, path)


def _magnitude_lines(ax, values: np.ndarray, token_labels: Sequence[str], max_dims: int | None = None,
                     label_size: float = 6) -> None:
    """Draw |values| [seq, dim] on a 3D axis as the Massive Activations code does: each token a line over
    the feature dimensions, tokens along x; the two largest dims named on the feature axis."""
    mag = np.abs(np.asarray(values, np.float64))
    dims = np.arange(mag.shape[1])
    if max_dims is not None and max_dims < mag.shape[1]:
        dims = np.sort(np.argsort(mag.max(0))[-max_dims:])
        mag = mag[:, dims]
    for t in range(mag.shape[0]):
        ax.plot(np.full(len(dims), t), np.arange(len(dims)), mag[t], color="royalblue", lw=1.2)
    ax.set_xticks(np.arange(mag.shape[0]))
    ax.set_xticklabels(token_labels, fontsize=label_size, rotation=60, ha="right")
    # the largest dims named on the axis itself (a label in the plot would sit on a line)
    top = np.sort(np.argsort(mag.max(0))[-2:])
    ax.set_yticks(top)
    ax.set_yticklabels([str(dims[d]) for d in top], fontsize=label_size + 1)
    ax.set_ylabel("feature dim", fontsize=label_size + 1)
    ax.set_zlim(0, None)
    ax.tick_params(axis="z", labelsize=label_size)
    ax.view_init(elev=20, azim=-60)


def k_sweep(ks: Sequence[int], series: Mapping[str, Sequence[float]], title: str, path: str | Path,
            ylabel: str = "perplexity", log_y: bool = True) -> Path:
    """House of Cards Figure 4: a metric against k for each attack.

    Args:
      ks: the k values (x axis).
      series: attack name ("top-k zeroing", "top-k retaining") -> the metric at each k.
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      ylabel: the y axis' label.
      log_y: a log y axis in plain numbers (perplexity); False for the paper's mean zero-shot accuracy.

    Returns:
      `path` as a Path.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        ax.plot(list(ks), list(ys), marker="o", ms=4, label=name)
    return _finish(fig, ax, title, "k", ylabel, path, log_y=log_y)


def scaling_curve(factors: Sequence[float], values: Sequence[float], title: str, path: str | Path,
                  ylabel: str = "perplexity", log_y: bool = True) -> Path:
    """The Super Weight Figure 8: a metric against the super weight's scaling factor, a dashed line at 1.

    Args:
      factors: the scaling factors (x axis; 0 prunes the super weights, 1 leaves them as they are).
      values: the metric at each factor.
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      ylabel: the y axis' label.
      log_y: a log y axis for perplexity, so the pruned model's blow-up at 0 leaves the region around 1 readable;
        False for accuracy.

    Returns:
      `path` as a Path.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(list(factors), list(values), marker="o")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    return _finish(fig, ax, title, "super weight scaling factor", ylabel, path, log_y=log_y, legend=False)


def block_sweep(blocks: Sequence[str], series: Mapping[str, Sequence[float]], title: str, path: str | Path,
                ylabel: str = "perplexity", log_y: bool = True, reference: float | None = None) -> Path:
    """The Super Weight Figure 7: a metric against the quantization block size for each way of handling the outliers.

    Args:
      blocks: the labels, smallest block first ("64", ..., "tensor"), evenly spaced (the sizes double or more from
        one to the next).
      series: {curve: the metric at each block}, one line each.
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      ylabel: the y axis' label.
      log_y: a log y axis (perplexity); False for accuracy.
      reference: the unquantized model's value, a dashed line; None: no line.

    Returns:
      `path` as a Path.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(blocks))
    for name, ys in series.items():
        ax.plot(x, list(ys), marker="o", ms=4, label=name)
    if reference is not None:
        ax.axhline(reference, color="gray", lw=0.8, ls="--", label="unquantized")
    ax.set_xticks(x)
    ax.set_xticklabels(list(blocks))
    return _finish(fig, ax, title, "block size (consecutive weights sharing a scale)", ylabel, path, log_y=log_y)


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, path: str | Path | None, *, log_y: bool = True,
            legend: bool | str = True) -> Path | None:
    """Axis labels, title, log y axis (plain numbers), legend (True: inside; "outside": to the right); saves the
    figure to `path` (None: a panel, the caller saves)."""
    if log_y:
        _log_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(wrapped(title), fontsize=10)
    if legend == "outside":  # beside the axes, never over the data
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif legend:
        ax.legend(fontsize=8)
    if path is None:
        return None
    fig.tight_layout()
    return _save(fig, path)


def _log_axis(ax) -> None:
    """A log y axis in plain numbers ("20", not "2x10^1") with a labelled tick at or below the lowest point and
    at or above the highest, so no point sits beyond the last label: under a decade, a few round values
    (10, 20, ..., 50); over it, the decades around the data."""
    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ys = np.concatenate([np.asarray(line.get_ydata(), np.float64) for line in ax.get_lines()] or [np.zeros(0)])
    ys = ys[np.isfinite(ys) & (ys > 0)]
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if not len(ys):
        return
    low, high = ys.min(), ys.max()
    if high / low < 10:
        ticks = [t for t in ticker.MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high) if t > 0]
        below, above = [t for t in ticks if t <= low], [t for t in ticks if t >= high]
        first = below[-1] if below else _round_down(low)  # near 0 the round ticks reach 0: one digit below
        ticks = [first, *(t for t in ticks if first < t < above[0]), above[0]]
        ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylim(ticks[0] / 1.04, ticks[-1] * 1.04)
    else:
        view_low, view_high = ax.get_ylim()
        ax.set_ylim(min(view_low, 10 ** np.floor(np.log10(low))), max(view_high, 10 ** np.ceil(np.log10(high))))


def _round_down(x: float) -> float:
    """x > 0 rounded down to one significant digit: 14.7 -> 10, 0.57 -> 0.5."""
    scale = 10 ** np.floor(np.log10(x))
    return float(np.floor(x / scale) * scale)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.atomic_file(path) as partial:  # a killed run leaves no half-written figure
            fig.savefig(partial, dpi=DPI, format=path.suffix.lstrip(".") or None)  # .png, .pdf, .svg
    finally:
        plt.close(fig)
    return path


def token_label(tokenizer, token_id: int) -> str:
    """A token as a reader reads it: decoded ("cold", not BPE's "Ġcold"), with whitespace made visible.

    Args:
      tokenizer: an HF tokenizer (anything with `decode`).
      token_id: the token's id.

    Returns:
      The decoded text, stripped; a token of whitespace alone as its Python repr.
    """
    text = tokenizer.decode([int(token_id)])
    return text.strip() or repr(text)


def bos_profile(profile: massive.FirstTokenProfile, title: str, path_of) -> list[Path]:
    """House of Cards Figure 3(b, c): top-k and median |value| per layer for the first token alone, two figures.

    One figure (`layer_magnitudes`) for the hidden state and one for the intermediate state.

    Args:
      profile: the first token's per-layer profile (`mwjax.research.massive.first_token_profile`; its callers
        keep the top 3).
      title: the start of both titles (the model's name).
      path_of: `path_of(name)` names each file, name "bos_hidden" or "bos_intermediate".

    Returns:
      The two files written: [hidden, intermediate].
    """
    return [layer_magnitudes(getattr(profile, point).magnitudes, f"{title}: {point} state, first token alone",
                             path_of(f"bos_{point}"))
            for point in ("hidden", "intermediate")]


def grouped_bars(values: Mapping[str, Sequence[float]], title: str, path: str | Path) -> Path:
    """House of Cards Figure 3(a): one group of bars per layer (1-based), one bar per state (log y).

    Args:
      values: state name (the legend's label) -> max |value| per layer, [L] each, the same L for every state.
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.

    Returns:
      `path` as a Path.
    """
    names = list(values)
    n_layers = len(next(iter(values.values())))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7 + 0.25 * len(names), 3.8))
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    for i, name in enumerate(names):
        ax.bar(np.arange(n_layers) + i * width, values[name], width, label=name, color=colors[i % len(colors)])
    ax.set_xticks(np.arange(n_layers) + 0.4 - width / 2)
    ax.set_xticklabels([str(i + 1) for i in range(n_layers)])
    return _finish(fig, ax, title, "layer l (1-based)", "max |value|", path, legend="outside")


def likert_bars(scores: Mapping[str, float], title: str, path: str | Path) -> Path:
    """House of Cards Table 3 as bars: a judge's mean 1-5 score per column (MT-1, ..., Avg.).

    Args:
      scores: column -> the judge's mean score, one bar each in the order given.
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.

    Returns:
      `path` as a Path.
    """
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(list(scores), list(scores.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylim(1, 5.3)
    ax.tick_params(axis="x", labelrotation=30)
    return _finish(fig, ax, title, "", "mean score (1-5)", path, log_y=False, legend=False)


def attention_sinks(columns: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[str]]], title: str,
                    row_titles: tuple[str, str], path: str | Path) -> Path:
    """House of Cards Figure 2 / Figures 8-18: the hidden state and attention, one column per bos placement.

    Top row: the |hidden state| over tokens x feature dims (as `magnitudes_3d`); bottom row: the head-averaged
    attention probabilities (query rows, key columns, causal: nothing above the diagonal) on one colour scale
    from 0 to 1.

    Args:
      columns: one (column title, |h| [seq, d], attention [seq, seq], token labels [seq]) per placement.
      title: the figure's title (wrapped to fit).
      row_titles: the (top, bottom) rows' titles, written vertically at their left.
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.

    Returns:
      `path` as a Path.
    """
    n = len(columns)
    fig = plt.figure(figsize=(4.2 * n, 8.4))
    image = None
    for i, (name, magnitudes, attention, labels) in enumerate(columns):
        ax = fig.add_subplot(2, n, i + 1, projection="3d")
        _magnitude_lines(ax, magnitudes, labels)
        ax.set_title(f"{name}\nmax |h| {np.max(magnitudes):,.1f}", fontsize=10)
        ax = fig.add_subplot(2, n, n + i + 1)
        causal = np.ma.masked_where(np.triu(np.ones_like(attention, bool), k=1), attention)
        image = ax.imshow(causal, cmap=_prob_cmap(), vmin=0.0, vmax=1.0)
        ticks = np.arange(len(labels))
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=7, rotation=90)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.text(0.005, 0.75, row_titles[0], rotation=90, va="center", fontsize=10)
    fig.text(0.005, 0.27, row_titles[1], rotation=90, va="center", fontsize=10)
    fig.suptitle(wrapped(title))
    fig.tight_layout(rect=(0.015, 0.0, 0.93, 0.97))
    fig.colorbar(image, cax=fig.add_axes((0.945, 0.08, 0.012, 0.36)), label="attention probability")
    return _save(fig, path)


def router_probs(probs: np.ndarray, title: str, path: str | Path, mark_layer: int | None = None) -> Path:
    """House of Cards Figure 5: the router's probability of each expert per layer for the bos token.

    Experts are rows (HF's 0-based expert index), layers columns (1-based); each cell shows its probability
    while the grid has at most 512 cells (Mixtral-8x7B's 32 x 8).

    Args:
      probs: [L, E] router probabilities, rows summing to 1 (`massive.first_token_router_probs`).
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      mark_layer: a layer (0-based) framed in red, e.g. the massive weights' layer; None for none.

    Returns:
      `path` as a Path.
    """
    probs = np.asarray(probs, np.float64)
    num_layers, num_experts = probs.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * num_layers + 2), max(2.5, 0.4 * num_experts + 1.2)))
    image = ax.imshow(probs.T, cmap=_prob_cmap(), vmin=0.0, vmax=1.0, aspect="auto")
    if num_layers * num_experts <= 512:  # Mixtral-8x7B's 32 x 8 still reads
        for (layer, expert), p in np.ndenumerate(probs):
            ax.text(layer, expert, f"{p:.2f}".lstrip("0"), ha="center", va="center", fontsize=6,
                    color="white" if p > 0.6 else "black")
    if mark_layer is not None:
        ax.add_patch(patches.Rectangle((mark_layer - 0.5, -0.5), 1, num_experts, fill=False, edgecolor="red", lw=1.5))
    ax.set_xticks(np.arange(num_layers))
    ax.set_xticklabels([str(i + 1) for i in range(num_layers)], fontsize=7)
    ax.set_yticks(np.arange(num_experts))
    ax.set_xlabel("layer (1-based)")
    ax.set_ylabel("expert")
    ax.set_title(wrapped(title), fontsize=10)
    fig.colorbar(image, ax=ax, label="router probability", pad=0.01)
    fig.tight_layout()
    return _save(fig, path)


def category_bars(scores: Mapping[str, float], categories: Mapping[str, Sequence[str]], title: str,
                  path: str | Path, ylabel: str = "score (%)") -> Path:
    """House of Cards Table 9 as a figure: one bar per dataset, coloured by its category, the mean dashed.

    Args:
      scores: dataset -> score, one bar each in the order given.
      categories: category (a legend entry) -> the datasets it lists; a dataset no category lists is grey.
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      ylabel: the y axis' label.

    Returns:
      `path` as a Path.
    """
    names = list(scores)
    colour = {name: f"C{i}" for i, members in enumerate(categories.values()) for name in members}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.5))
    ax.bar(np.arange(len(names)), [scores[n] for n in names], color=[colour.get(n, "gray") for n in names])
    ax.axhline(float(np.mean([scores[n] for n in names])), color="black", lw=0.8, ls="--", label="mean")
    for i, (category, members) in enumerate(categories.items()):
        if any(n in scores for n in members):
            ax.bar([0], [0], color=f"C{i}", label=category)  # a legend entry, nothing drawn
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    return _finish(fig, ax, title, "", ylabel, path, log_y=False)


def grouped_bars_with_errors(groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                             title: str, path: str | Path, ylabel: str = "accuracy (%)",
                             reference: float | None = None) -> Path:
    """Bars per group (e.g. fine-tuning method) and series (e.g. clean / attacked), with error bars.

    Args:
      groups: the groups' names along x.
      series: series name -> (means, errors), one value per group each; the errors drawn as error bars (e.g. the
        spread over seeds).
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      ylabel: the y axis' label.
      reference: a value drawn as a dashed line labelled "chance" (e.g. 25 for four choices); None for none.

    Returns:
      `path` as a Path.
    """
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 2.0), 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (name, (means, errors)) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=errors, capsize=3, label=name)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=0.8, label=f"chance {reference:g}")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    return _finish(fig, ax, title, "", ylabel, path, log_y=False, legend="outside")


def pruning_summary(labels: Sequence[str], perplexities: Mapping[str, Sequence[float]], dense: float,
                    removed: Sequence[float], retained: Sequence[float], title: str, path: str | Path) -> Path:
    """Pruning (Wanda / magnitude) against the massive weights: two panels over the same pruning settings.

    Left: perplexity per protection setting (bars, log y) with the dense model's as a dashed line (thesis Table
    3.3's comparison). Right, without protection: the fraction of the top-k massive rows' entries pruned and the
    first token's top-1 massive intermediate value left (pruned / dense).

    Args:
      labels: the pruning settings along x ("wanda 50%", "magnitude 2:4", ...).
      perplexities: protection setting (the legend's label) -> the perplexity at each of `labels`.
      dense: the dense model's perplexity.
      removed: per setting, the fraction of the top-k massive rows' entries pruned (no protection).
      retained: per setting, the first token's top-1 massive intermediate value, pruned / dense (no protection).
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.

    Returns:
      `path` as a Path.
    """
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
    fig.suptitle(wrapped(title))
    fig.tight_layout()
    return _save(fig, path)


def super_activation(traces: Sequence[super_mechanism.SuperActivationTrace], title: str, path: str | Path) -> Path:
    """The Super Weight Figure 4: |hidden state| at each super activation's channel and token after every layer
    (log y), with the super weights (solid) and pruned (dashed); a dotted line at each trace's super weight layer.

    Args:
      traces: the traces (`super_mechanism.super_activation_traces`), one colour each.
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.

    Returns:
      `path` as a Path.
    """
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, trace in enumerate(traces):
        layers = np.arange(len(trace.original))
        name = f"channel {trace.row}, token {trace.position}"
        ax.plot(layers, np.abs(trace.original), marker="o", ms=3, color=f"C{i}", label=f"{name}")
        ax.plot(layers, np.abs(trace.pruned), marker="s", ms=3, ls="--", color=f"C{i}",
                label=f"{name}, pruned: {100 * abs(trace.drop):.0f}% {'lower' if trace.drop >= 0 else 'higher'} "
                      f"after layer {trace.layer}")
        ax.axvline(trace.layer, color=f"C{i}", lw=0.6, ls=":")
    _finish(fig, ax, title, "decoder layer (HF index)", "|hidden state|", None, legend=False)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def down_proj_maxima(spikes: massive.DownProjSpikes, title: str, path: str | Path,
                     mark_layers: Sequence[int] = ()) -> Path:
    """The Super Weight Figures 3 / 10: max |down_proj input| (left) and |output| (right) per layer, the largest of
    each labelled with its channel (the super weight's column / row); dotted lines at `mark_layers`.

    Args:
      spikes: the per-layer spikes on the detection prompt (`massive.down_proj_spikes`).
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.
      mark_layers: layers to mark (0-based), e.g. those of the super weights found.

    Returns:
      `path` as a Path.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, spike, name in zip(axes, (spikes.input, spikes.output), ("input", "output"), strict=True):
        values = np.abs(np.asarray(spike.value, np.float64))
        layers = np.arange(len(values))
        ax.plot(layers, values, marker="o", ms=3, color="C0" if name == "input" else "C1")
        for layer in sorted(set(mark_layers)):
            ax.axvline(layer, color="gray", lw=0.6, ls=":")
        top = int(np.argmax(values))
        ax.annotate(f"channel {int(spike.channel[top])}", (top, values[top]), textcoords="offset points",
                    xytext=(6, -4), fontsize=8, va="top")
        ax.set_ylim(0, values[top] * 1.1 if values[top] > 0 else None)
        _finish(fig, ax, f"down_proj {name}", "decoder layer (HF index)", f"max |down_proj {name}|", None,
                log_y=False, legend=False)
    fig.suptitle(wrapped(title))
    fig.tight_layout()
    return _save(fig, path)


def stopword_shift(shift: super_mechanism.StopwordShift, title: str, path: str | Path) -> Path:
    """The Super Weight Figure 2 III / Figure 11: the mean next-token probability on stopwords and on the other
    tokens, before and after the attack (stacked bars, left), and the tokens whose mean probability rose most
    (grouped bars, right; stopwords in bold).

    Args:
      shift: the statistics (`super_mechanism.stopword_shift`).
      title: the figure's title (wrapped to fit).
      path: the file written; its suffix (.png, .pdf, .svg) sets the format.

    Returns:
      `path` as a Path.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 3]})
    x = np.arange(2)
    stop = [shift.stopword_before, shift.stopword_after]
    other = [shift.other_before, shift.other_after]
    left.bar(x, stop, 0.6, color="C4", label="stopwords")
    left.bar(x, other, 0.6, bottom=stop, color="C7", label="other tokens")
    for i in x:
        left.text(i, stop[i] / 2, f"{stop[i]:.3f}", ha="center", va="center", fontsize=8, color="white")
    left.set_xticks(x)
    left.set_xticklabels(["original", "SW pruned"])
    left.set_ylim(0, 1.25)
    _finish(fig, left, f"stopwords x{shift.stopword_ratio:.2f}, others x{shift.other_ratio:.2f}", "",
            "mean probability mass", None, log_y=False)
    left.legend(fontsize=7, loc="upper center", ncol=2)
    x = np.arange(len(shift.rising))
    width = 0.4
    right.bar(x - width / 2, [t.before for t in shift.rising], width, label="original")
    right.bar(x + width / 2, [t.after for t in shift.rising], width, label="SW pruned")
    right.set_xticks(x)
    labels = right.set_xticklabels([t.text.strip() or repr(t.text) for t in shift.rising], fontsize=8, rotation=30,
                                   ha="right")
    for label, token in zip(labels, shift.rising, strict=True):
        label.set_fontweight("bold" if token.stopword else "normal")
    _finish(fig, right, "tokens whose mean probability rose most", "", "mean probability", None, log_y=False)
    fig.suptitle(wrapped(title))
    fig.tight_layout()
    return _save(fig, path)
