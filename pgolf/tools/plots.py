"""PNG renderings of the pipeline's curves, viewable with no network.

`dvc plots show` builds HTML whose JavaScript comes from a CDN; these PNGs are
the offline view. Matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from pgolf.io import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_lines(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               title: str, xlabel: str, ylabel: str, logy: bool = False, logx: bool = False) -> None:
    """One line per named (x, y) series, written atomically to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, (xs, ys) in series.items():
        if len(xs):
            ax.plot(list(xs), list(ys), label=name, linewidth=1.4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_bars(path: str | Path, labels: Sequence[str], values: Sequence[float],
              title: str, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(labels) + 2), 4), dpi=110)
    ax.bar(range(len(values)), list(values))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(list(labels), rotation=90, fontsize=6)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_running_bpb(path: str | Path, chunks: Sequence[Mapping], sliding_bpb: float) -> None:
    """eval_ttt's picture: running and per-chunk bpb against the chunk index, eval_sliding's bpb as the reference."""
    index = [row["chunk"] for row in chunks]
    ends = [index[0], index[-1]] if index else []
    plot_lines(path, {"running bpb (scored so far)": (index, [row["running_bpb"] for row in chunks]),
                      "chunk bpb": (index, [row["chunk_bpb"] for row in chunks]),
                      "sliding, no TTT": (ends, [sliding_bpb] * len(ends))},
               "score-first TTT", "chunk", "bits per byte")
