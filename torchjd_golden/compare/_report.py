r"""
The report of ``torchjd-golden compare``, in Markdown and CSV: per workload and method, the
numbers of :mod:`._summary` (the test metrics, :math:`\Delta_m\%`, the mean rank, the applied
weights and shares, the time per step) as mean and standard deviation over seeds, with the
settings of every method, the source of every workload and the check against the Golden Pendulum
paper (its :math:`\alpha` balance).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ._methods import ADAM_BETAS, BATCH_SIZE, LEARNING_RATE, Method
from ._sources import sources_note, sources_table
from ._summary import Statistic, Summary, metric_key, settled
from ._workloads import Task, Workload

COLLAPSE_WEIGHT = 0.9
"""
A method whose largest task weight averages at least this much, on a task whose share of the
update does too, has collapsed onto that task. A large weight on a task whose gradient is tiny
(Golden Pendulum's w_k = α_k / ||g_k|| where the losses differ by 10^5) is not a collapse: the
share tells.
"""

PAPER_ALPHA_BALANCE = 0.24
r"""Golden Pendulum's balance in its paper's table (four tasks, disparate losses): that of its QP
solution :math:`\alpha`, its weights on the normalised gradients."""

PAPER_NASH_BALANCE = 0.04
"""NashMTL's w_min / w_max in the same table, that of its weights on the raw gradients."""

PAPER_WORKLOAD = "synthetic"

MAX_TASK_COLUMNS = 8
"""A workload with more tasks shows their mean metric in its table, not one column per task."""


def markdown_report(summaries: Sequence[Summary], steps: int, jobs: int) -> str:
    """The tables, one per workload, then the settings and the notes under them."""

    blocks = [
        table(summaries, workload)
        for workload in _workloads(summaries)
        for table in (_table, _weights_table)
    ]
    sources = sources_table(summaries)
    if sources is not None:
        blocks.append(sources)
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
    by_metric = _tasks_by_metric(tasks)
    if by_metric is None:
        header = ["method", *(f"{t.name} ({t.metric})" for t in tasks)]
    else:
        header = ["method", *(f"mean {metric} ({len(of)} tasks)" for metric, of in by_metric)]
    header += [
        "Δm% vs single-task",
        "mean rank",
        "share balance s_min/s_max",
        "largest share",
        "weight balance w_min/w_max",
        "ms / step",
    ]
    lines = [
        f"### {workload.name}: {workload.description} (seeds {seeds})",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for s in rows:
        if by_metric is None:
            cells = [s.label, *(s.metrics[t.name].format(3) for t in tasks)]
        else:
            cells = [s.label, *(_mean_metric(s, of).format(3) for _, of in by_metric)]
        cells.append("0 (reference)" if s.delta_m is None else s.delta_m.format(2, signed=True))
        cells += [
            _cell(s.statistic(quantity), digits)
            for quantity, digits in (
                ("mean_rank", 2),
                ("share_balance", 3),
                ("largest_share", 3),
                ("weight_balance", 3),
            )
        ]
        cells.append(f"{s.ms_per_step.mean:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tasks_by_metric(tasks: Sequence[Task]) -> list[tuple[str, list[Task]]] | None:
    """The tasks grouped by metric where there are too many for a column each, else None."""

    if len(tasks) <= MAX_TASK_COLUMNS:
        return None
    groups: dict[str, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.metric, []).append(task)
    return list(groups.items())


def _mean_metric(summary: Summary, tasks: Sequence[Task]) -> Statistic:
    """The mean over ``tasks`` of their test metric, per seed, then over seeds."""

    per_task = torch.tensor([summary.per_seed[metric_key(t)] for t in tasks])
    return Statistic.of(per_task.mean(dim=0).tolist())


def _weights_table(summaries: Sequence[Summary], workload: Workload) -> str:
    """
    Per method and task, the applied weight w and the share s of the update, as means; for a
    workload with too many tasks for a column each, the tasks with the largest and the smallest.
    """

    rows = [s for s in summaries if s.workload.name == workload.name and s.method is not None]
    tasks = workload.tasks
    many = len(tasks) > MAX_TASK_COLUMNS
    if many:
        header = ["method"] + [
            f"{extreme} {kind} (task)"
            for kind in ("weight w", "share s")
            for extreme in ("largest", "smallest")
        ]
    else:
        header = ["method", *(f"{t.name} w / s" for t in tasks)]
    lines = [
        f"Task weights w (applied, unit total) and shares s of the update on {workload.name}, "
        "mean over seeds:",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for s in rows:
        weights = [s.statistic(f"{task.name} weight") for task in tasks]
        shares = [s.statistic(f"{task.name} share") for task in tasks]
        cells = [s.label]
        if many:
            for values in (weights, shares):
                if any(value is None for value in values):
                    cells += ["—", "—"]
                    continue
                means = torch.tensor([value.mean for value in values if value is not None])
                cells += _extremes(means, tasks)
        else:
            for weight, share in zip(weights, shares, strict=True):
                if weight is None or share is None:
                    cells.append("—")
                else:
                    cells.append(f"{weight.mean:.3f} / {share.mean:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extremes(means: Tensor, tasks: Sequence[Task]) -> list[str]:
    """The largest and the smallest of ``means`` (one per task), each with its task's name."""

    largest, smallest = (f"{float(means[k]):.3f}" for k in (means.argmax(), means.argmin()))
    if largest == smallest:  # naming one task would suggest it stands out
        return [f"{largest} (every task)"] * 2
    return [
        f"{largest} ({tasks[int(means.argmax())].name})",
        f"{smallest} ({tasks[int(means.argmin())].name})",
    ]


def _cell(statistic: Statistic | None, digits: int = 3) -> str:
    return "—" if statistic is None else statistic.format(digits)


def _settings(summaries: Sequence[Summary], steps: int, jobs: int) -> str:
    seeds = ", ".join(map(str, summaries[0].seeds))
    lines = [
        "**Settings.** Every run: a shared MLP (64, 64) with one linear head per task, "
        "the step engine `JacobianDescent(network, aggregator, shared=network.trunk)` "
        "(gramian_from='parameters': torchjd's `mtl_backward` then `jac_to_grad` on the trunk), "
        f"Adam with lr={LEARNING_RATE} and "
        f"betas={ADAM_BETAS} unless said below, batches of {BATCH_SIZE}, {steps} steps, seeds "
        f"{seeds} (the same data split, initialisation and batches for every method of a seed). "
        "Test metrics on the held-out 20%, mean ± standard deviation over seeds. Δm% is the mean "
        "over tasks of 100 (M - M_single) / M_single against the single-task baseline of the "
        "same seed (the same network with one head, trained on its task alone), as LibMTL's "
        "count_improvement; every metric here is higher-is-better. The mean rank is, per seed, "
        "the mean over tasks of the method's rank on the task's test metric among the methods "
        "(1 = best, ties share the mean of their ranks), then averaged over seeds. For every "
        "method, w_k are "
        "the weights it applied to the rows g_k of the trunk's Jacobian (those the step "
        "returns), normalised to unit total, and s_k = |w_k| ||g_k|| / sum_j |w_j| ||g_j|| is "
        "task k's share of the update; balances are min_k / max_k, and every one of these is "
        "averaged over the second half of training; — for a method that applies no weights. "
        "GCond's update carries a momentum, so its weights are those of its resolved gradient "
        "before it (`resolution_weights`). "
        f"ms / step: one thread per run, {jobs} run(s) at a time; for the baselines, one step "
        "of each of their networks.",
        "",
    ]
    configured: dict[str, list[tuple[str, Method]]] = {}  # label: (workload, method) pairs
    for s in summaries:
        # A (features) row has the settings of the method's exact row.
        if s.method is not None and s.method.gramian_from == "parameters":
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
    lines += ["", "Workloads:", ""]
    lines += [f"- {workload.name}: {workload.source}" for workload in _workloads(summaries)]
    notes = [_many_tasks_note(workload) for workload in _workloads(summaries)]
    lines += [note for note in notes if note is not None]
    lines += _left_out_notes(summaries)
    note = sources_note(summaries)
    if note is not None:
        lines += ["", "Sources of the weights:", "", note]
    return "\n".join(lines)


def _many_tasks_note(workload: Workload) -> str | None:
    """For a workload with too many tasks for a column each: where its tasks' numbers are."""

    if len(workload.tasks) <= MAX_TASK_COLUMNS:
        return None
    return (
        f"- On {workload.name} ({len(workload.tasks)} tasks) the tables give each metric's mean "
        "over the tasks and the tasks with the largest and the smallest weight and share; "
        "every task's metric, weight and share is in results.csv."
    )


def _left_out_notes(summaries: Sequence[Summary]) -> list[str]:
    """A line for each method the default run left out of some workloads, with the reason."""

    ran: dict[str, set[str]] = {}  # method name: the workloads it ran on
    first: dict[str, Summary] = {}
    for s in summaries:
        if s.method is not None:
            ran.setdefault(s.method.name, set()).add(s.workload.name)
            first.setdefault(s.method.name, s)
    notes = []
    for name, workloads in ran.items():
        method = first[name].method
        assert method is not None
        missing = [w for w in _workloads(summaries) if w.name not in workloads]
        if missing and method.settings.left_out_reason:
            where = ", ".join(f"{w.name} ({len(w.tasks)} tasks)" for w in missing)
            notes.append(
                f"- {first[name].label} is left out of {where} in the default run: "
                f"{method.settings.left_out_reason}"
            )
    return notes


def headline_check(summaries: Sequence[Summary]) -> str | None:
    r"""
    The α balance (the paper's check): Golden Pendulum's :math:`\alpha_{\min}/\alpha_{\max}` on
    the synthetic workload against its paper's 0.24, and NashMTL's :math:`w_{\min}/w_{\max}`
    against its 0.04 when NashMTL ran; then both methods on the same basis. None when Golden
    Pendulum was not run there.
    """

    found: dict[str, Summary] = {}
    for s in summaries:
        if s.method is not None and s.workload.name == PAPER_WORKLOAD:
            found.setdefault(type(s.method.aggregator).__name__, s)
    golden, nash = found.get("GoldenPendulum"), found.get("NashMTL")
    alpha = None if golden is None else golden.statistic("alpha_balance")
    if golden is None or alpha is None:
        return None
    reproduced = math.isclose(alpha.mean, PAPER_ALPHA_BALANCE, abs_tol=0.03)
    checked = [
        f"GoldenPendulum's α_min/α_max, its QP solution (weights on the normalised gradients), "
        f"{alpha.format(3)} (paper {PAPER_ALPHA_BALANCE})"
    ]
    same_basis = [golden]
    nash_weights = None if nash is None else nash.statistic("weight_balance")
    if nash is not None and nash_weights is not None:
        reproduced = reproduced and nash_weights.mean <= 0.1
        checked.append(
            f"NashMTL's w_min/w_max, its weights on the raw gradients, {nash_weights.format(3)} "
            f"(paper {PAPER_NASH_BALANCE})"
        )
        same_basis.append(nash)
    comparable = "; ".join(
        f"{s.label} w_min/w_max {_mean(s, 'weight_balance')}, s_min/s_max "
        f"{_mean(s, 'share_balance')}"
        for s in same_basis
    )
    return (
        "α balance (paper's check), 4 tasks with a 300x loss disparity: "
        f"{'; '.join(checked)}: {'reproduced' if reproduced else 'NOT reproduced'}. "
        f"On the basis every table row uses (applied weights, shares of the update): {comparable}."
    )


def _mean(summary: Summary, quantity: str) -> str:
    statistic = summary.statistic(quantity)
    return "—" if statistic is None else f"{statistic.mean:.3f}"


def _collapse_notes(summaries: Sequence[Summary]) -> list[str]:
    notes = []
    for s in summaries:
        largest = s.statistic("largest_weight")
        if s.method is None or s.weights is None or largest is None:
            continue  # the baselines, and methods without weights
        if largest.mean < COLLAPSE_WEIGHT:
            continue
        average = settled(s.weights).abs().mean(dim=(0, 1))
        index = int(average.argmax())
        share = s.statistic(f"{s.workload.tasks[index].name} share")
        if share is None or share.mean < COLLAPSE_WEIGHT:
            continue
        task = s.workload.tasks[index].name
        reason = s.method.settings.collapse_reason or "its weighting rule drives it there."
        notes.append(
            f"{s.label} collapses onto {task!r} on {s.workload.name} (largest weight "
            f"{largest.mean:.2f}, share of the update {share.mean:.2f}): {reason}"
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
