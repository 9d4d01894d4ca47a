"""Plots and contact sheets of the evaluation commands (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: str | Path, x: Sequence[float], series: dict[str, Sequence[float | None]], xlabel: str,
               ylabel: str, title: str, ylim: tuple[float, float] | None = (0.0, 1.0),
               xticks: Sequence[float] | None = None, xticklabels: Sequence[str] | None = None,
               intervals: dict[str, Sequence[Sequence[float] | None]] | None = None) -> Path:
    """One line per series; `intervals` (same names, a (low, high) per point) are drawn as bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    _draw_lines(ax, x, series, intervals)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if xticks is not None:
        ax.set_xticks(list(xticks))
        if xticklabels is not None:
            ax.set_xticklabels(list(xticklabels))
    ax.grid(alpha=0.3)
    return _save(plt, fig, ax, path, legend=len(series) > 1)


def _draw_lines(ax, x: Sequence[float], series: dict[str, Sequence[float | None]],
                intervals: dict[str, Sequence[Sequence[float] | None]] | None) -> None:
    for name, ys in series.items():
        band = (intervals or {}).get(name) or [None] * len(ys)
        pts = [(xi, yi, ci) for xi, yi, ci in zip(x, ys, band) if yi is not None]
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ci_pts = [p for p in pts if p[2] is not None]
            if ci_pts:
                ax.fill_between([p[0] for p in ci_pts], [p[2][0] for p in ci_pts], [p[2][1] for p in ci_pts],
                                color=line.get_color(), alpha=0.15, linewidth=0)


def plot_panels(path: str | Path, x: Sequence[float], panels: dict[str, dict[str, Sequence[float | None]]],
                xlabel: str, ylabel: str, title: str, ylim: tuple[float, float] | None = (0.0, 1.0),
                intervals: dict[str, dict[str, Sequence[Sequence[float] | None]]] | None = None,
                chance: dict[str, float] | None = None) -> Path:
    """Side-by-side line plots sharing x and y (one panel per key, e.g. per attribute), the same
    series names in each; `chance` draws a dashed level per panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), dpi=110, sharey=True, squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        _draw_lines(ax, x, series, (intervals or {}).get(name))
        if chance and name in chance:
            ax.axhline(chance[name], color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    return _write(plt, fig, path)


def plot_bars(path: str | Path, categories: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
              title: str, ylim: tuple[float, float] | None = None,
              intervals: dict[str, Sequence[Sequence[float]]] | None = None) -> Path:
    """Grouped bars; `intervals` (same names, a (low, high) per category) are drawn as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(categories) * max(1, len(series))), 4.2), dpi=110)
    n = max(1, len(series))
    width = 0.8 / n
    xs = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        values = list(values)
        yerr = None
        if intervals and name in intervals:
            yerr = np.array([[v - lo for v, (lo, _) in zip(values, intervals[name])],
                             [hi - v for v, (_, hi) in zip(values, intervals[name])]]).clip(min=0)
        ax.bar(xs + (i - (n - 1) / 2) * width, values, width, label=name, yerr=yerr, capsize=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(list(categories), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, ax, path, legend=len(series) > 1)


def image_grid(images: Sequence[Image.Image], cols: int = 8, marks: Sequence[bool] | None = None,
               scale: int = 2) -> Image.Image:
    """A contact sheet; with `marks`, a green (True) or red (False) frame around each image."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    w, h = w * scale, h * scale
    pad = 4
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)
        if marks is not None:
            color = (30, 160, 60) if marks[i] else (200, 30, 30)
            draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline=color, width=2)
        sheet.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
    return sheet


def _save(plt, fig, ax, path: str | Path, legend: bool) -> Path:
    """Legend (when several series), tight layout, write the PNG (parents made), close."""
    if legend:
        ax.legend(fontsize=8)
    return _write(plt, fig, path)


def _write(plt, fig, path: str | Path) -> Path:
    """Tight layout, write the PNG (parents made), close."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
