"""
The figures of ``torchjd-golden compare``: one per workload (the applied task weights, each
task's share of the update and the training losses of every method) and a compact one of the
shares on the synthetic workload, for the README. Every curve is the mean over seeds of a moving
average, with the range over seeds as a band; a task has the same colour in every panel and
figure. A method that applies no task weights shows a dash in their panels.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._report import PAPER_WORKLOAD
from ._summary import Summary

SMOOTHING = 10
"""Window, in steps, of the trailing moving average of every curve."""

COLUMNS = 4
PANELS = ("task weight", "share of update", "training loss")
"""The panels of each method in a workload's figure, top to bottom."""
COMPACT_WIDTH_INCHES = 8.0
COMPACT_DPI = 150
TITLE_CHARACTERS_PER_INCH = 14
"""How many characters of a figure's title fit on an inch of its width, at its font size."""
LEGEND_TASKS = 10
"""Up to this many tasks, each has a colour of its own, a band and a legend entry; beyond,
the tasks are coloured along a colour map, without bands (they would hide each other)."""


def write_plots(summaries: Sequence[Summary], directory: Path) -> list[Path]:
    """
    ``<workload>.png`` for each workload and, when the synthetic workload was run,
    ``summary.png`` (the shares of the update there, 1200 px wide, legible at 800 px). Needs
    matplotlib.
    """

    plt = _pyplot()
    paths = []
    for workload in dict.fromkeys(s.workload.name for s in summaries):
        rows = [s for s in summaries if s.workload.name == workload]
        figure = _workload_figure(plt, rows)
        paths.append(directory / f"{workload}.png")
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
        if workload == PAPER_WORKLOAD:
            figure = _compact_figure(plt, rows)
            paths.append(directory / "summary.png")
            figure.savefig(paths[-1], dpi=COMPACT_DPI)
            plt.close(figure)
    return paths


def _pyplot() -> Any:
    import matplotlib as mpl  # noqa: PLC0415 - an optional dependency

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _workload_figure(plt: Any, rows: Sequence[Summary]) -> Any:
    """Per method, its task weights, its shares of the update and its training losses."""

    baseline = next(s for s in rows if s.method is None)
    methods = [s for s in rows if s.method is not None]
    tasks = baseline.workload.tasks
    columns = min(COLUMNS, len(methods))
    blocks = math.ceil(len(methods) / columns)
    figure = plt.figure(figsize=(3.0 * columns, 6.4 * blocks + 0.8))
    # Each method's three panels touch; a spacer row leaves room for the next method's title.
    heights = [*([1.0] * len(PANELS)), 0.32] * blocks
    grid = figure.add_gridspec(
        len(heights) - 1, columns, height_ratios=heights[:-1], hspace=0.08, wspace=0.1
    )
    losses = torch.cat([s.losses.flatten() for s in rows])
    loss_limits = (float(losses.min().clamp(min=1e-4)) / 1.5, float(losses.max()) * 1.5)
    first: list[Any] = [None] * len(PANELS)  # the first method's panels, sharing their y axes
    for index, summary in enumerate(methods):
        row, column = (len(PANELS) + 1) * (index // columns), index % columns
        axes: list[Any] = []
        for offset in range(len(PANELS)):
            axes.append(
                figure.add_subplot(
                    grid[row + offset, column],
                    sharex=axes[0] if axes else None,
                    sharey=first[offset],
                )
            )
        first = [shared or axis for shared, axis in zip(first, axes, strict=True)]
        weight_axis, share_axis, loss_axis = axes
        _fractions(weight_axis, summary.weights, len(tasks))
        _fractions(share_axis, summary.shares, len(tasks))
        for k in range(len(tasks)):
            _mean_and_band(
                loss_axis,
                summary.losses[:, :, k],
                _colour(k, len(tasks)),
                band=len(tasks) <= LEGEND_TASKS,
            )
        weight_axis.set_title(summary.label, fontsize=10)
        loss_axis.set_yscale("log")
        loss_axis.set_ylim(*loss_limits)
        loss_axis.set_xlabel("training step", fontsize=9)
        for axis, name in zip(axes, PANELS, strict=True):
            if axis is not loss_axis:
                axis.tick_params(labelbottom=False)
            if column == 0:
                axis.set_ylabel(name, fontsize=9)
            else:
                axis.tick_params(labelleft=False)
            _style(axis)
    if len(tasks) <= LEGEND_TASKS:
        handles = [
            plt.Line2D([], [], color=_colour(k, len(tasks)), linewidth=2) for k in range(len(tasks))
        ]
        figure.legend(
            handles,
            [f"{t.name} ({t.metric})" for t in tasks],
            loc="upper center",
            ncol=len(tasks),
            fontsize=10,
            frameon=False,
            bbox_to_anchor=(0.5, 1.0),
        )
        how = "band: range over seeds"
    else:
        how = (
            f"one curve per task, coloured from the first ({tasks[0].name}, dark) to the last "
            f"({tasks[-1].name}, light)"
        )
    title = textwrap.wrap(
        f"{baseline.workload.name}: {baseline.workload.description}. Mean over seeds "
        f"{', '.join(map(str, baseline.seeds))} of a {SMOOTHING}-step moving average; {how}",
        width=int(TITLE_CHARACTERS_PER_INCH * figure.get_figwidth()),
    )
    title_top = 0.33 if len(tasks) <= LEGEND_TASKS else 0.1  # inches, below the legend
    figure.suptitle("\n".join(title), fontsize=9, y=1.0 - title_top / figure.get_figheight())
    figure.subplots_adjust(
        top=1.0 - (title_top + 0.16 * len(title) + 0.3) / figure.get_figheight(),
        bottom=0.5 / figure.get_figheight(),
        left=0.07,
        right=0.98,
    )
    return figure


def _compact_figure(plt: Any, rows: Sequence[Summary]) -> Any:
    """Each task's share of the update, for every method on the synthetic workload."""

    methods = [s for s in rows if s.method is not None]
    tasks = rows[0].workload.tasks
    columns = min(COLUMNS, len(methods) + 1)
    lines = math.ceil((len(methods) + 1) / columns)  # one cell for the legend
    width = COMPACT_WIDTH_INCHES
    figure, axes = plt.subplots(
        lines,
        columns,
        figsize=(width, 2.2 * lines + 0.3),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    cells = [axis for line in axes for axis in line]
    for axis, summary in zip(cells, methods, strict=False):
        assert summary.method is not None
        _fractions(axis, summary.shares, len(tasks))
        balance = summary.statistic("share_balance")
        balance_text = "" if balance is None else f" · balance {balance.mean:.2f}"
        mode = " (features)" if summary.method.gramian_from == "features" else ""
        axis.set_title(f"{summary.method.aggregator}{mode}{balance_text}", fontsize=9)
        _style(axis)
    for index, axis in enumerate(cells[: len(methods)]):
        if index % columns == 0:
            axis.set_ylabel("share of update", fontsize=9)
        if index + columns >= len(methods):  # no method below it
            axis.set_xlabel("training step", fontsize=9)
            axis.tick_params(labelbottom=True)
    legend_axis = cells[len(methods)]
    legend_axis.axis("off")
    handles = [
        plt.Line2D([], [], color=_colour(k, len(tasks)), linewidth=2.5) for k in range(len(tasks))
    ]
    legend_axis.legend(
        handles,
        [t.name for t in tasks],
        loc="center",
        fontsize=9,
        frameon=False,
        title=f"{rows[0].workload.name}, {_count(len(rows[0].seeds), 'seed')}",
        title_fontsize=9,
    )
    for axis in cells[len(methods) + 1 :]:
        axis.set_visible(False)
    return figure


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _colour(k: int, m: int) -> Any:
    """Task ``k``'s colour among ``m``, the same in every panel and figure."""

    if m <= LEGEND_TASKS:
        return f"C{k}"
    from matplotlib import colormaps  # noqa: PLC0415 - an optional dependency

    return colormaps["viridis"](k / (m - 1))


def _mean_and_band(axis: Any, curves: Tensor, colour: Any, band: bool = True) -> None:
    """
    ``curves``: seeds x steps. The mean of the smoothed curves and, where ``band``, their
    range.
    """

    smoothed = torch.stack([_smooth(curve) for curve in curves])
    steps = torch.arange(1, smoothed.shape[1] + 1)
    if band:
        axis.fill_between(
            steps.numpy(),
            smoothed.min(dim=0).values.numpy(),
            smoothed.max(dim=0).values.numpy(),
            color=colour,
            alpha=0.2,
            linewidth=0,
        )
    axis.plot(steps.numpy(), smoothed.mean(dim=0).numpy(), color=colour, linewidth=1.4)


def _fractions(axis: Any, values: Tensor | None, m: int) -> None:
    """
    ``values`` (seeds x steps x m, weights or shares of unit total) as one curve per task, from 0
    to 1 (from -1 where a weight is negative); a dash for a method without them.
    """

    if values is None:
        _note(axis, "—\nno task weights", fontsize=12)
        axis.set_ylim(0.0, 1.0)
        return
    for k in range(m):
        _mean_and_band(axis, values[:, :, k], _colour(k, m), band=m <= LEGEND_TASKS)
    if torch.allclose(values, torch.full_like(values, 1.0 / m), atol=1e-3):
        _note(axis, "equal for every task:\nthe curves overlap")
    axis.set_ylim(min(0.0, float(values.min())), 1.0)


def _note(axis: Any, text: str, fontsize: int = 8) -> None:
    axis.text(
        0.5,
        0.62,
        text,
        transform=axis.transAxes,
        ha="center",
        va="center",
        fontsize=fontsize,
        color="0.3",
    )


def _style(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415 - optional

    if axis.get_yscale() == "log":
        # Decades as plain numbers (0.1, 1, 10): easier to read, and much faster to draw, than
        # typeset powers of ten. Minor labels would be as large as these; the decades suffice.
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.tick_params(labelsize=8)
    axis.grid(alpha=0.3, linewidth=0.5)


def _smooth(values: Tensor, window: int = SMOOTHING) -> Tensor:
    """A trailing moving average, for readable curves."""

    cumulative = torch.cat([torch.zeros(1), values.double().cumsum(0)])
    counts = torch.arange(1, values.numel() + 1).clamp(max=window)
    ends = torch.arange(1, values.numel() + 1)
    return ((cumulative[ends] - cumulative[ends - counts]) / counts).float()
