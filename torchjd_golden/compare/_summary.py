r"""
The numbers of the report of ``torchjd-golden compare``, per workload and method over seeds:
each task's test metric, :math:`\Delta_m\%` over the single-task baselines, the method's mean
rank over the tasks among the methods, the weights the method applied, each task's share of the
update and their balance, and the time per step.

One definition for every method: the weights :math:`w_k` are those the method applied to the
rows :math:`g_k` of the trunk's Jacobian, normalised to :math:`\sum_k |w_k| = 1`; task
:math:`k`'s share of the update is :math:`s_k = |w_k| \|g_k\| / \sum_j |w_j| \|g_j\|`; the
balance of either is :math:`\min_k / \max_k`. The table's balance column is that of the shares:
a small weight on a task with a large gradient does not starve it, a small share does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._methods import Method
from ._training import Run
from ._workloads import Task, Workload


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
    ms_per_step: Statistic
    losses: Tensor
    """Training losses, ``seeds x steps x m``."""

    weights: Tensor | None
    """Applied task weights, normalised to unit total, ``seeds x steps x m``; None for the
    baselines and for a method without weights."""

    shares: Tensor | None
    """Each task's share of the update, ``seeds x steps x m``; None where ``weights`` is."""

    alphas: Tensor | None
    """Golden Pendulum's QP solution, ``seeds x steps x m``; None for the other methods."""

    per_seed: dict[str, list[float]]
    """Every reported quantity, one value per seed, for ``runs.csv``."""

    def statistic(self, quantity: str) -> Statistic | None:
        """The mean and std over seeds of ``quantity`` (a key of ``per_seed``), None if absent."""

        values = self.per_seed.get(quantity)
        return None if values is None else Statistic.of(values)


def balance(values: Tensor) -> Tensor:
    r"""
    :math:`\min_k |v_k| / \max_k |v_k|` over the last dimension: 1 when every task gets the
    same, 0 when one gets nothing.
    """

    magnitudes = values.abs()
    return magnitudes.min(dim=-1).values / magnitudes.max(dim=-1).values


def delta_m(metrics: dict[str, float], baseline: dict[str, float], tasks: Sequence[Task]) -> float:
    r"""
    :math:`\Delta_m\% = \frac{100}{K} \sum_k (M_k - B_k) / B_k`, LibMTL's ``count_improvement``
    for metrics where higher is better (R2 and accuracy both are): the mean relative change of
    each task's metric :math:`M_k` against its single-task baseline :math:`B_k`.
    """

    changes = [(metrics[t.name] - baseline[t.name]) / abs(baseline[t.name]) for t in tasks]
    return 100.0 * sum(changes) / len(changes)


def mean_ranks(metrics: Sequence[dict[str, float]], tasks: Sequence[Task]) -> list[float]:
    """
    Each method's mean over ``tasks`` of its rank on the task's test metric among the methods
    (``metrics``, one dict per method): 1 for the best, as every metric here is higher-is-better;
    tied methods share the mean of the ranks they span, so that a task's ranks always add up to
    n (n + 1) / 2 for n methods.
    """

    table = torch.tensor([[m[t.name] for t in tasks] for m in metrics], dtype=torch.float64)
    # [i, j, k]: whether method j beats (or ties with) method i on task k.
    beaten_by = (table.unsqueeze(0) > table.unsqueeze(1)).sum(dim=1)
    tied_with = (table.unsqueeze(0) == table.unsqueeze(1)).sum(dim=1) - 1
    ranks = 1.0 + beaten_by + tied_with / 2.0
    return ranks.mean(dim=1).tolist()


def summarize(
    workloads: Sequence[Workload],
    methods: dict[str, list[Method]],
    runs: Sequence[Run],
) -> list[Summary]:
    """
    One summary per workload for its single-task baselines, then one per method, in the order
    of ``methods[workload.name]``. ``runs`` holds every job's run; Δm% compares each seed with
    the baselines of the same seed, and the mean rank each method with the others on the same
    seed.
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
        by_method = [
            {
                r.job.seed: r
                for r in of_workload
                if (r.job.method, r.job.gramian_from) == (method.name, method.gramian_from)
            }
            for method in methods[workload.name]
        ]
        ranks = [  # per seed, each method's mean rank
            mean_ranks([by_seed[seed].metrics for by_seed in by_method], workload.tasks)
            for seed in seeds
        ]
        for index, (method, by_seed) in enumerate(
            zip(methods[workload.name], by_method, strict=True)
        ):
            mean_rank = [of_seed[index] for of_seed in ranks]
            summaries.append(
                _method_summary(workload, method, seeds, by_seed, baselines, mean_rank)
            )
    return summaries


def _baseline_summary(
    workload: Workload,
    seeds: tuple[int, ...],
    runs: Sequence[Run],
    baselines: dict[int, dict[str, float]],
) -> Summary:
    tasks = workload.tasks
    per_seed = {metric_key(t): [baselines[s][t.name] for s in seeds] for t in tasks}
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
        metrics={t.name: Statistic.of(per_seed[metric_key(t)]) for t in tasks},
        delta_m=None,
        ms_per_step=Statistic.of(ms),
        losses=losses,
        weights=None,
        shares=None,
        alphas=None,
        per_seed=per_seed,
    )


def _method_summary(
    workload: Workload,
    method: Method,
    seeds: tuple[int, ...],
    by_seed: dict[int, Run],
    baselines: dict[int, dict[str, float]],
    mean_rank: list[float],
) -> Summary:
    tasks = workload.tasks
    runs = [by_seed[s] for s in seeds]
    weights = _over_seeds([r.weights for r in runs])
    shares = _over_seeds([r.shares for r in runs])
    alphas = _over_seeds([r.alphas for r in runs])
    per_seed = {metric_key(t): [r.metrics[t.name] for r in runs] for t in tasks}
    per_seed["delta_m_percent"] = [
        delta_m(r.metrics, baselines[s], tasks) for s, r in zip(seeds, runs, strict=True)
    ]
    per_seed["mean_rank"] = mean_rank
    if weights is not None and shares is not None:
        per_seed |= _weight_quantities(tasks, settled(weights), settled(shares))
    if alphas is not None:
        per_seed["alpha_balance"] = balance(settled(alphas)).mean(dim=1).tolist()
    per_seed["ms_per_step"] = [1e3 * r.seconds_per_step for r in runs]
    return Summary(
        workload=workload,
        label=method.label,
        method=method,
        seeds=seeds,
        metrics={t.name: Statistic.of(per_seed[metric_key(t)]) for t in tasks},
        delta_m=Statistic.of(per_seed["delta_m_percent"]),
        ms_per_step=Statistic.of(per_seed["ms_per_step"]),
        losses=torch.stack([r.losses for r in runs]),
        weights=weights,
        shares=shares,
        alphas=alphas,
        per_seed=per_seed,
    )


def _over_seeds(per_run: Sequence[Tensor | None]) -> Tensor | None:
    """``seeds x steps x m``, or None unless every run has the quantity."""

    present = [t for t in per_run if t is not None]
    return torch.stack(present) if present and len(present) == len(per_run) else None


def settled(values: Tensor) -> Tensor:
    """The second half of training, where the reported averages are taken."""

    return values[:, values.shape[1] // 2 :]


def _weight_quantities(
    tasks: Sequence[Task], weights: Tensor, shares: Tensor
) -> dict[str, list[float]]:
    """Per seed, the averages over steps of the weights, the shares and their balance."""

    quantities = {
        "share_balance": balance(shares).mean(dim=1).tolist(),
        "largest_share": shares.max(dim=2).values.mean(dim=1).tolist(),
        "weight_balance": balance(weights).mean(dim=1).tolist(),
        "largest_weight": weights.abs().max(dim=2).values.mean(dim=1).tolist(),
    }
    for k, task in enumerate(tasks):
        quantities[f"{task.name} weight"] = weights[:, :, k].mean(dim=1).tolist()
        quantities[f"{task.name} share"] = shares[:, :, k].mean(dim=1).tolist()
    return quantities


def metric_key(task: Task) -> str:
    return f"{task.name} {task.metric}"
