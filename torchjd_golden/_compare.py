"""
``torchjd-golden compare``: trains one small multi-task model per method and workload, and
reports test metrics, the balance of the task weights, and the time per step.
"""

from __future__ import annotations

import csv
import inspect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchjd.aggregation import Aggregator
from torchjd.autojac import jac_to_grad, mtl_backward

from ._config import _lookup, aggregator_from_config
from ._workloads import Task, Workload

DEFAULT_METHODS = ("golden_pendulum", "gaba", "excess_mtl", "gcond", "mean", "upgrad", "nash_mtl")
OPTIONAL_METHODS = {"nash_mtl"}  # in the defaults only when its dependencies are installed
BATCH_SIZE = 64


@dataclass
class MethodResult:
    """What one method did on one workload."""

    workload: str
    method: str
    tasks: tuple[Task, ...]
    metrics: dict[str, float]
    balance_ratio: float
    largest_weight: float
    seconds_per_step: float
    weights: Tensor = field(repr=False)  # steps x m, normalised task weights
    losses: Tensor = field(repr=False)  # steps x m


def build_methods(
    names: Iterable[str], n_tasks: int
) -> tuple[list[tuple[str, Aggregator]], list[str]]:
    """
    The aggregators for ``names`` (any :func:`aggregator_from_config` name), and notes about the
    optional ones left out because their dependencies are missing.
    """

    methods, notes = [], []
    for name in names:
        try:
            aggregator = aggregator_from_config(_spec(name, n_tasks))
        except ImportError as error:
            if name not in OPTIONAL_METHODS:
                raise
            notes.append(f"{name} skipped: {error}")
            continue
        methods.append((str(aggregator), aggregator))
    return methods, notes


def _spec(name: str, n_tasks: int) -> dict[str, Any]:
    """``{"name": name}``, plus ``n_tasks`` for an aggregator that asks for it (NashMTL)."""

    parameters = inspect.signature(_lookup("aggregator", name).factory).parameters
    return {"name": name, **({"n_tasks": n_tasks} if "n_tasks" in parameters else {})}


class MultiTaskNetwork(nn.Module):
    """A shared MLP trunk and one linear head per task."""

    def __init__(self, n_inputs: int, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_inputs, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(64, task.n_outputs) for task in tasks])

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(inputs)
        return features, [head(features) for head in self.heads]


def train(
    workload: Workload,
    name: str,
    aggregator: Aggregator,
    steps: int,
    seed: int,
    device: torch.device,
    progress: bool,
) -> MethodResult:
    """Trains a fresh network (same seed for every method) and evaluates it on the test set."""

    torch.manual_seed(seed)
    network = MultiTaskNetwork(workload.train_inputs.shape[1], workload.tasks).to(device)
    aggregator = aggregator.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    inputs, targets = workload.train_inputs.to(device), workload.train_targets.to(device)
    generator = torch.Generator().manual_seed(seed)
    weight_history, loss_history = [], []

    start = time.perf_counter()
    for _ in _progress(range(steps), f"{workload.name}/{name}", progress):
        batch = torch.randint(0, inputs.shape[0], (BATCH_SIZE,), generator=generator).to(device)
        features, outputs = network(inputs[batch])
        losses = [
            task.loss(output, target)
            for task, output, target in zip(workload.tasks, outputs, targets[batch].T, strict=True)
        ]
        if hasattr(aggregator, "losses"):  # the adaptive Golden Pendulum's extra input
            aggregator.losses = torch.stack(losses).detach()
        mtl_backward(losses, features=features)
        returned = jac_to_grad(network.trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
        weight_history.append(_task_weights(aggregator, returned, len(losses), device))
        loss_history.append(torch.stack(losses).detach())
    seconds = (time.perf_counter() - start) / steps

    with torch.no_grad():
        _, outputs = network(workload.test_inputs.to(device))
        metrics = {
            task.name: task.score(output, target)
            for task, output, target in zip(
                workload.tasks, outputs, workload.test_targets.to(device).T, strict=True
            )
        }
    weights = torch.stack(weight_history).cpu()
    settled = weights[steps // 2 :]
    return MethodResult(
        workload=workload.name,
        method=name,
        tasks=workload.tasks,
        metrics=metrics,
        balance_ratio=float((settled.min(dim=1).values / settled.max(dim=1).values).mean()),
        largest_weight=float(settled.max(dim=1).values.mean()),
        seconds_per_step=seconds,
        weights=weights,
        losses=torch.stack(loss_history).cpu(),
    )


def _task_weights(
    aggregator: Aggregator, returned: Tensor | None, m: int, device: torch.device
) -> Tensor:
    """
    The method's task weights, normalised to unit total: Golden Pendulum's QP solution (the
    weights its paper reports, on normalised gradients), else the weights ``jac_to_grad``
    returned; uniform for an aggregator that has none.
    """

    alpha = getattr(aggregator, "alpha", None)
    weights = alpha if isinstance(alpha, Tensor) and alpha.numel() == m else returned
    if weights is None:
        return torch.full((m,), 1.0 / m, device=device)
    weights = weights.detach().float()
    return weights / weights.abs().sum()


def _progress(steps: range, description: str, enabled: bool) -> Iterable[int]:
    if not enabled:
        return steps
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - an optional dependency
    except ImportError:
        return steps
    return tqdm(steps, desc=description, leave=False, unit="step")  # type: ignore[no-any-return]


def markdown_table(results: Sequence[MethodResult]) -> str:
    """One table per workload: test metrics per task, weight balance, largest weight, time."""

    blocks = []
    for workload in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == workload]
        tasks = rows[0].tasks
        header = ["method", *(f"{t.name} ({t.metric})" for t in tasks)]
        header += ["balance w_min/w_max", "largest weight", "ms / step"]
        lines = [
            f"### {workload}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for r in rows:
            cells = [r.method, *(f"{r.metrics[t.name]:.3f}" for t in tasks)]
            cells += [
                f"{r.balance_ratio:.3f}",
                f"{r.largest_weight:.3f}",
                f"{1e3 * r.seconds_per_step:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def write_csv(results: Sequence[MethodResult], path: Path) -> None:
    """One row per measured quantity: workload, method, quantity, value."""

    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["workload", "method", "quantity", "value"])
        for r in results:
            for task in r.tasks:
                writer.writerow(
                    [r.workload, r.method, f"{task.name} {task.metric}", r.metrics[task.name]]
                )
            writer.writerow([r.workload, r.method, "balance_ratio", r.balance_ratio])
            writer.writerow([r.workload, r.method, "largest_weight", r.largest_weight])
            writer.writerow([r.workload, r.method, "seconds_per_step", r.seconds_per_step])


def write_plots(results: Sequence[MethodResult], directory: Path) -> list[Path]:
    """``weights.png`` (task weights over steps, per method) and ``losses.png`` (loss curves)."""

    import matplotlib as mpl  # noqa: PLC0415 - an optional dependency

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    workloads = list(dict.fromkeys(r.workload for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    by_key = {(r.workload, r.method): r for r in results}

    figure, axes = plt.subplots(
        len(workloads),
        len(methods),
        figsize=(2.6 * len(methods), 2.3 * len(workloads)),
        squeeze=False,
        sharey=True,
    )
    for row, workload in enumerate(workloads):
        for column, method in enumerate(methods):
            axis, result = axes[row][column], by_key[(workload, method)]
            for k, task in enumerate(result.tasks):
                axis.plot(_smooth(result.weights[:, k]), label=task.name, linewidth=1.2)
            axis.set_title(f"{method}\n{workload}" if row == 0 else workload, fontsize=8)
            axis.tick_params(labelsize=7)
        axes[row][0].set_ylabel("task weight", fontsize=8)
        axes[row][-1].legend(fontsize=6, loc="upper right")
    figure.tight_layout()
    weights_path = directory / "weights.png"
    figure.savefig(weights_path, dpi=110)
    plt.close(figure)

    n_tasks = max(len(r.tasks) for r in results)
    figure, axes = plt.subplots(
        len(workloads), n_tasks, figsize=(2.8 * n_tasks, 2.4 * len(workloads)), squeeze=False
    )
    for row, workload in enumerate(workloads):
        tasks = by_key[(workload, methods[0])].tasks
        for k in range(n_tasks):
            axis = axes[row][k]
            if k >= len(tasks):
                axis.set_visible(False)
                continue
            for method in methods:
                axis.plot(
                    _smooth(by_key[(workload, method)].losses[:, k]), label=method, linewidth=1.0
                )
            axis.set_yscale("log")
            axis.set_title(f"{workload}: {tasks[k].name} loss", fontsize=8)
            axis.tick_params(labelsize=7)
        axes[row][0].legend(fontsize=6)
    figure.tight_layout()
    losses_path = directory / "losses.png"
    figure.savefig(losses_path, dpi=110)
    plt.close(figure)
    return [weights_path, losses_path]


def _smooth(values: Tensor, window: int = 10) -> Tensor:
    """A trailing moving average, for readable curves."""

    cumulative = torch.cat([torch.zeros(1), values.double().cumsum(0)])
    counts = torch.arange(1, values.numel() + 1).clamp(max=window)
    ends = torch.arange(1, values.numel() + 1)
    return ((cumulative[ends] - cumulative[ends - counts]) / counts).float()
