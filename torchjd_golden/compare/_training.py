"""
One training run of ``torchjd-golden compare``: a method, or the single-task baseline of one
task, on one workload with one seed. Runs are independent of each other and of the order they
run in, so that they can be spread over worker processes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn
from torchjd.aggregation import Aggregator
from torchjd.autojac import jac_to_grad, mtl_backward

from ._methods import ADAM_BETAS, BATCH_SIZE, LEARNING_RATE, Method, build_method
from ._workloads import WORKLOADS, Task, Workload

HIDDEN = 64


@dataclass(frozen=True)
class Job:
    """What to train: ``method`` (an aggregator name) or the baseline of task index ``task``."""

    workload: str
    seed: int
    steps: int
    device: str = "cpu"
    method: str | None = None
    task: int | None = None

    def __post_init__(self) -> None:
        if (self.method is None) == (self.task is None):
            raise ValueError("A job trains either a method or a single-task baseline.")


@dataclass(frozen=True)
class Run:
    """What one job measured."""

    job: Job
    metrics: dict[str, float]
    """Test metric per task name (a baseline: its one task)."""

    seconds_per_step: float
    losses: Tensor
    """Training loss per step and task, ``steps x m`` (a baseline: ``steps x 1``)."""

    weights: Tensor | None
    """Task weights per step, normalised to unit total, ``steps x m`` (a baseline: None)."""


class MultiTaskNetwork(nn.Module):
    """A shared two-layer MLP trunk and one linear head per task."""

    def __init__(self, n_inputs: int, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(n_inputs, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(HIDDEN, task.n_outputs) for task in tasks])

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(inputs)
        return features, [head(features) for head in self.heads]


@cache
def load_workload(name: str, seed: int) -> Workload:
    """The workload ``name`` split with ``seed``, built once per process."""

    return WORKLOADS[name](seed)


def run_job(job: Job) -> Run:
    """Trains what ``job`` names on a fresh network seeded by ``job.seed``."""

    workload = load_workload(job.workload, job.seed)
    device = torch.device(job.device)
    if job.task is not None:
        return _train_single_task(workload, job, job.task, device)
    assert job.method is not None
    return _train_method(workload, job, build_method(job.method, workload, job.steps), device)


def _train_method(workload: Workload, job: Job, method: Method, device: torch.device) -> Run:
    torch.manual_seed(job.seed)
    network = MultiTaskNetwork(workload.train_inputs.shape[1], workload.tasks).to(device)
    aggregator = method.aggregator.to(device)
    if hasattr(type(aggregator), "tasks"):  # per-task state keyed by name, where supported
        aggregator.tasks = [task.name for task in workload.tasks]  # type: ignore[assignment]
    optimizer = _adam(network, method.settings.adam_betas)
    inputs, targets = workload.train_inputs.to(device), workload.train_targets.to(device)
    weight_history, loss_history = [], []

    with warnings.catch_warnings():
        # cvxpy says at every NashMTL solve that its problem cannot be cached, and now and then
        # that ECOS stopped at its iteration limit (NashMTL then keeps its previous weights).
        warnings.filterwarnings("ignore", message="You are solving a parameterized problem")
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        start = time.perf_counter()
        for batch in _batches(workload, job, device):
            features, outputs = network(inputs[batch])
            losses = [
                task.loss(output, target)
                for task, output, target in zip(
                    workload.tasks, outputs, targets[batch].T, strict=True
                )
            ]
            if hasattr(aggregator, "losses"):  # the adaptive Golden Pendulum's extra input
                aggregator.losses = torch.stack(losses).detach()
            mtl_backward(losses, features=features)
            returned = jac_to_grad(network.trunk.parameters(), aggregator)
            optimizer.step()
            optimizer.zero_grad()
            weight_history.append(_task_weights(aggregator, returned, len(losses), device))
            loss_history.append(torch.stack(losses).detach())
        seconds = (time.perf_counter() - start) / job.steps

    return Run(
        job=job,
        metrics=_evaluate(network, workload, workload.tasks, range(len(workload.tasks)), device),
        seconds_per_step=seconds,
        losses=torch.stack(loss_history).cpu(),
        weights=torch.stack(weight_history).cpu(),
    )


def _train_single_task(workload: Workload, job: Job, index: int, device: torch.device) -> Run:
    """The same network with one head, trained on one task alone with a plain backward pass."""

    task = workload.tasks[index]
    torch.manual_seed(job.seed)
    network = MultiTaskNetwork(workload.train_inputs.shape[1], (task,)).to(device)
    optimizer = _adam(network, ADAM_BETAS)
    inputs = workload.train_inputs.to(device)
    targets = workload.train_targets[:, index].to(device)
    loss_history = []

    start = time.perf_counter()
    for batch in _batches(workload, job, device):
        _, (output,) = network(inputs[batch])
        loss = task.loss(output, targets[batch])
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
        loss_history.append(loss.detach())
    seconds = (time.perf_counter() - start) / job.steps

    return Run(
        job=job,
        metrics=_evaluate(network, workload, (task,), [index], device),
        seconds_per_step=seconds,
        losses=torch.stack(loss_history).unsqueeze(1).cpu(),
        weights=None,
    )


def _adam(network: nn.Module, betas: tuple[float, float]) -> torch.optim.Adam:
    # The fused kernel: on these small networks the per-tensor Python loop of the default
    # implementation costs about a tenth of a training step.
    return torch.optim.Adam(network.parameters(), lr=LEARNING_RATE, betas=betas, fused=True)


def _batches(workload: Workload, job: Job, device: torch.device) -> list[Tensor]:
    """The same mini-batches, in the same order, for every method and baseline of a seed."""

    generator = torch.Generator().manual_seed(job.seed)
    n = workload.train_inputs.shape[0]
    return [
        torch.randint(0, n, (BATCH_SIZE,), generator=generator).to(device) for _ in range(job.steps)
    ]


def _evaluate(
    network: MultiTaskNetwork,
    workload: Workload,
    tasks: Sequence[Task],
    columns: Sequence[int],
    device: torch.device,
) -> dict[str, float]:
    with torch.no_grad():
        _, outputs = network(workload.test_inputs.to(device))
        targets = workload.test_targets.to(device)
        return {
            task.name: task.score(output, targets[:, column])
            for task, output, column in zip(tasks, outputs, columns, strict=True)
        }


def _task_weights(
    aggregator: Aggregator, returned: Tensor | None, m: int, device: torch.device
) -> Tensor:
    """
    The method's task weights, normalised to unit total: Golden Pendulum's QP solution (the
    weights its paper reports, on normalised gradients), GCond's resolution weights (of its
    resolved gradient, before the momentum: it returns no weights), else the weights
    ``jac_to_grad`` returned; uniform for an aggregator that has none.
    """

    alpha = getattr(aggregator, "alpha", None)
    if not isinstance(alpha, Tensor) or alpha.numel() != m:
        alpha = getattr(aggregator, "resolution_weights", None)
    weights = alpha if isinstance(alpha, Tensor) and alpha.numel() == m else returned
    if weights is None:
        return torch.full((m,), 1.0 / m, device=device)
    weights = weights.detach().float()
    return weights / weights.abs().sum()
