r"""
The report of ``torchjd-golden compare``: per workload and method, each task's test metric, the
multi-task improvement :math:`\Delta_m\%` over the single-task baselines, the balance of the task
weights and the time per step, as mean and standard deviation over seeds; in Markdown and CSV,
with the settings of every method and the check against the Golden Pendulum paper.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._methods import ADAM_BETAS, BATCH_SIZE, LEARNING_RATE, Method
from ._training import Run
from ._workloads import Task, Workload

COLLAPSE_WEIGHT = 0.9
"""A method whose largest task weight averages at least this much has collapsed onto one task."""

PAPER_BALANCE = {"GoldenPendulum": 0.24, "NashMTL": 0.04}
"""w_min / w_max of the Golden Pendulum paper's table, four tasks with disparate losses."""

PAPER_WORKLOAD = "synthetic"


@dataclass(frozen=True)
class Statistic:
    """Mean and sample standard deviation over seeds (0 for one seed)."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Statistic:
        tensor = torch.tensor(values, dtype=torch.float64)
        std = float(tensor.std()) if len(values) > 1 else 0.0
        return cls(float(tensor.mean()), std)

    def format(self, digits: int, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.mean:{sign}.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Summary:
    """One method (or the single-task baselines) on one workload, over seeds."""

    workload: Workload
    label: str
    method: Method | None
    """None for the row of single-task baselines."""

    seeds: tuple[int, ...]
    metrics: dict[str, Statistic]
    delta_m: Statistic | None
    balance: Statistic | None
    largest_weight: Statistic | None
    ms_per_step: Statistic
    losses: Tensor
    """Training losses, ``seeds x steps x m``."""

    weights: Tensor | None
    """Normalised task weights, ``seeds x steps x m``; None for the baselines."""

    per_seed: dict[str, list[float]]
    """Every reported quantity, one value per seed, for ``runs.csv``."""


def delta_m(metrics: dict[str, float], baseline: dict[str, float], tasks: Sequence[Task]) -> float:
    r"""
    :math:`\Delta_m\% = \frac{100}{K} \sum_k (M_k - B_k) / B_k`, LibMTL's ``count_improvement``
    for metrics where higher is better (R2 and accuracy both are): the mean relative change of
    each task's metric :math:`M_k` against its single-task baseline :math:`B_k`.
    """

    changes = [(metrics[t.name] - baseline[t.name]) / abs(baseline[t.name]) for t in tasks]
    return 100.0 * sum(changes) / len(changes)


def summarize(
    workloads: Sequence[Workload],
    methods: dict[str, list[Method]],
    runs: Sequence[Run],
) -> list[Summary]:
    """
    One summary per workload for its single-task baselines, then one per method, in the order
    of ``methods[workload.name]``. ``runs`` holds every job's run; Δm% compares each seed with
    the baselines of the same seed.
    """

    summaries = []
    for workload in workloads:
        of_workload = [r for r in runs if r.job.workload == workload.name]
        seeds = tuple(sorted({r.job.seed for r in of_workload}))
        baselines = {
            seed: {
                name: value
                for r in of_workload
                if r.job.seed == seed and r.job.task is not None
                for name, value in r.metrics.items()
            }
            for seed in seeds
        }
        summaries.append(_baseline_summary(workload, seeds, of_workload, baselines))
        for method in methods[workload.name]:
            by_seed = {r.job.seed: r for r in of_workload if r.job.method == method.name}
            summaries.append(_method_summary(workload, method, seeds, by_seed, baselines))
    return summaries


def _baseline_summary(
    workload: Workload,
    seeds: tuple[int, ...],
    runs: Sequence[Run],
    baselines: dict[int, dict[str, float]],
) -> Summary:
    tasks = workload.tasks
    per_seed = {_metric_key(t): [baselines[s][t.name] for s in seeds] for t in tasks}
    by_task = {
        (r.job.seed, r.job.task): r for r in runs if r.job.task is not None
    }  # the time of the baselines is that of training all of them, one after the other
    ms = [1e3 * sum(by_task[(s, k)].seconds_per_step for k in range(len(tasks))) for s in seeds]
    per_seed["ms_per_step"] = ms
    losses = torch.stack(
        [torch.cat([by_task[(s, k)].losses for k in range(len(tasks))], dim=1) for s in seeds]
    )
    return Summary(
        workload=workload,
        label="single-task baselines",
        method=None,
        seeds=seeds,
        metrics={t.name: Statistic.of(per_seed[_metric_key(t)]) for t in tasks},
        delta_m=None,
        balance=None,
        largest_weight=None,
        ms_per_step=Statistic.of(ms),
        losses=losses,
        weights=None,
        per_seed=per_seed,
    )


def _method_summary(
    workload: Workload,
    method: Method,
    seeds: tuple[int, ...],
    by_seed: dict[int, Run],
    baselines: dict[int, dict[str, float]],
) -> Summary:
    tasks = workload.tasks
    runs = [by_seed[s] for s in seeds]
    weights = torch.stack([r.weights for r in runs if r.weights is not None])
    settled = weights[:, weights.shape[1] // 2 :]  # the second half of training
    largest = settled.max(dim=2).values
    per_seed = {_metric_key(t): [r.metrics[t.name] for r in runs] for t in tasks}
    per_seed["delta_m_percent"] = [
        delta_m(r.metrics, baselines[s], tasks) for s, r in zip(seeds, runs, strict=True)
    ]
    per_seed["balance_ratio"] = (settled.min(dim=2).values / largest).mean(dim=1).tolist()
    per_seed["largest_weight"] = largest.mean(dim=1).tolist()
    per_seed["ms_per_step"] = [1e3 * r.seconds_per_step for r in runs]
    return Summary(
        workload=workload,
        label=method.label,
        method=method,
        seeds=seeds,
        metrics={t.name: Statistic.of(per_seed[_metric_key(t)]) for t in tasks},
        delta_m=Statistic.of(per_seed["delta_m_percent"]),
        balance=Statistic.of(per_seed["balance_ratio"]),
        largest_weight=Statistic.of(per_seed["largest_weight"]),
        ms_per_step=Statistic.of(per_seed["ms_per_step"]),
        losses=torch.stack([r.losses for r in runs]),
        weights=weights,
        per_seed=per_seed,
    )


def _metric_key(task: Task) -> str:
    return f"{task.name} {task.metric}"


def markdown_report(summaries: Sequence[Summary], steps: int, jobs: int) -> str:
    """The tables, one per workload, then the settings and the notes under them."""

    blocks = [_table(summaries, workload) for workload in _workloads(summaries)]
    blocks.append(_settings(summaries, steps, jobs))
    notes = [line for line in (headline_check(summaries), *_collapse_notes(summaries)) if line]
    if notes:
        blocks.append("\n".join(f"- {note}" for note in notes))
    return "\n\n".join(blocks) + "\n"


def _workloads(summaries: Sequence[Summary]) -> list[Workload]:
    return list({s.workload.name: s.workload for s in summaries}.values())


def _table(summaries: Sequence[Summary], workload: Workload) -> str:
    rows = [s for s in summaries if s.workload.name == workload.name]
    tasks = workload.tasks
    seeds = ", ".join(map(str, rows[0].seeds))
    header = ["method", *(f"{t.name} ({t.metric})" for t in tasks)]
    header += ["Δm% vs single-task", "balance w_min/w_max", "largest weight", "ms / step"]
    lines = [
        f"### {workload.name}: {workload.description} (seeds {seeds})",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for s in rows:
        cells = [s.label, *(s.metrics[t.name].format(3) for t in tasks)]
        cells += [
            "0 (reference)" if s.delta_m is None else s.delta_m.format(2, signed=True),
            "—" if s.balance is None else s.balance.format(3),
            "—" if s.largest_weight is None else s.largest_weight.format(3),
            f"{s.ms_per_step.mean:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings(summaries: Sequence[Summary], steps: int, jobs: int) -> str:
    seeds = ", ".join(map(str, summaries[0].seeds))
    lines = [
        "**Settings.** Every run: a shared MLP (64, 64) with one linear head per task, "
        f"`mtl_backward` then `jac_to_grad` on the trunk, Adam with lr={LEARNING_RATE} and "
        f"betas={ADAM_BETAS} unless said below, batches of {BATCH_SIZE}, {steps} steps, seeds "
        f"{seeds} (the same data split, initialisation and batches for every method of a seed). "
        "Test metrics on the held-out 20%, mean ± standard deviation over seeds. Δm% is the mean "
        "over tasks of 100 (M - M_single) / M_single against the single-task baseline of the "
        "same seed (the same network with one head, trained on its task alone), as LibMTL's "
        "count_improvement; every metric here is higher-is-better. Balance and largest weight "
        "are averaged over the second half of training; Golden Pendulum's weights are its QP "
        "solution (as its paper reports them), GCond's the weights of its resolved gradient "
        "before the momentum (`resolution_weights`), the others' the weights `jac_to_grad` "
        f"returns, normalised to unit total. ms / step: one thread per run, {jobs} run(s) at a "
        "time; for the baselines, one step of each of their networks.",
        "",
    ]
    configured: dict[str, list[tuple[str, Method]]] = {}  # label: (workload, method) pairs
    for s in summaries:
        if s.method is not None:
            configured.setdefault(s.label, []).append((s.workload.name, s.method))
    for label, pairs in configured.items():
        settings = pairs[0][1].settings
        reprs = [f"`{method.aggregator!r}`" for _, method in pairs]
        if len(set(reprs)) > 1:  # settings that depend on the workload
            reprs = [
                f"{text} ({workload})" for text, (workload, _) in zip(reprs, pairs, strict=True)
            ]
        optimizer = (
            "" if settings.adam_betas == ADAM_BETAS else f"; Adam betas={settings.adam_betas}"
        )
        lines.append(
            f"- {label}: {', '.join(dict.fromkeys(reprs))}{optimizer}. Source: {settings.source}"
        )
    return "\n".join(lines)


def headline_check(summaries: Sequence[Summary]) -> str | None:
    """
    Golden Pendulum's and NashMTL's balance on the synthetic workload against the paper's table
    (0.24 and 0.04); None when either method was not run there.
    """

    found = {}
    for s in summaries:
        name = None if s.method is None else type(s.method.aggregator).__name__
        if s.workload.name == PAPER_WORKLOAD and name in PAPER_BALANCE and s.balance is not None:
            found[name] = s.balance
    if set(found) != set(PAPER_BALANCE):
        return None
    golden, nash = found["GoldenPendulum"], found["NashMTL"]
    reproduced = math.isclose(golden.mean, 0.24, abs_tol=0.03) and nash.mean <= 0.1
    return (
        "Check against the Golden Pendulum paper (4 tasks, 300x loss disparity): balance "
        f"w_min/w_max of GoldenPendulum {golden.format(3)} (paper 0.24), of NashMTL "
        f"{nash.format(3)} (paper 0.04): {'reproduced' if reproduced else 'NOT reproduced'}."
    )


def _collapse_notes(summaries: Sequence[Summary]) -> list[str]:
    notes = []
    for s in summaries:
        if s.method is None or s.weights is None or s.largest_weight is None:
            continue  # the baselines
        if s.largest_weight.mean < COLLAPSE_WEIGHT:
            continue
        settled = s.weights[:, s.weights.shape[1] // 2 :].mean(dim=(0, 1))
        task = s.workload.tasks[int(settled.argmax())].name
        reason = s.method.settings.collapse_reason or "its weighting rule drives it there."
        notes.append(
            f"{s.label} collapses onto {task!r} on {s.workload.name} (largest weight "
            f"{s.largest_weight.mean:.2f}): {reason}"
        )
    return notes


def write_csv(summaries: Sequence[Summary], directory: Path) -> list[Path]:
    """
    ``results.csv`` (workload, method, quantity, mean, std, seeds) and ``runs.csv`` (workload,
    method, seed, quantity, value).
    """

    results, runs = directory / "results.csv", directory / "runs.csv"
    with results.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["workload", "method", "quantity", "mean", "std", "seeds"])
        for s in summaries:
            for quantity, values in s.per_seed.items():
                statistic = Statistic.of(values)
                writer.writerow(
                    [s.workload.name, s.label, quantity, statistic.mean, statistic.std, len(values)]
                )
    with runs.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["workload", "method", "seed", "quantity", "value"])
        for s in summaries:
            for quantity, values in s.per_seed.items():
                for seed, value in zip(s.seeds, values, strict=True):
                    writer.writerow([s.workload.name, s.label, seed, quantity, value])
    return [results, runs]
