"""
One training run of ``torchjd-golden compare``: a method, or the single-task baseline of one
task, on one workload with one seed. Runs are independent of each other and of the order they
run in, so that they can be spread over worker processes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..step import GramianSource, JacobianDescent
from ._methods import (
    ADAM_BETAS,
    BATCH_SIZE,
    GRAMIAN_SOURCES,
    LEARNING_RATE,
    Method,
    build_method,
    gramian_weighting,
)
from ._workloads import WORKLOADS, Task, Workload

HIDDEN = 64


@dataclass(frozen=True)
class Job:
    """
    What to train: ``method`` (an aggregator name) with its weights from ``gramian_from``, or the
    baseline of task index ``task``.
    """

    workload: str
    seed: int
    steps: int
    device: str = "cpu"
    method: str | None = None
    task: int | None = None
    gramian_from: GramianSource = "parameters"

    def __post_init__(self) -> None:
        if (self.method is None) == (self.task is None):
            raise ValueError("A job trains either a method or a single-task baseline.")
        if self.gramian_from not in GRAMIAN_SOURCES:
            raise ValueError(
                f"Parameter `gramian_from` must be one of {GRAMIAN_SOURCES}. Found "
                f"{self.gramian_from!r}."
            )
        if self.task is not None and self.gramian_from != "parameters":
            raise ValueError("A single-task baseline has one task: it has no feature Gramian.")


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
    r"""
    The task weights the method applied (those the training step returned, on the rows of the
    trunk's Jacobian) per step, normalised to unit total :math:`\sum_k |w_k| = 1`, ``steps x m``;
    None for a baseline and for a method that does not combine the rows with weights (GradDrop).
    """

    shares: Tensor | None
    """
    Each task's share of the update per step, :func:`update_shares` of the applied weights and
    the rows' norms, ``steps x m``; None where ``weights`` is. The rows are those the weights
    were computed from: the tasks' gradients with respect to the trunk's parameters, or with
    ``gramian_from="features"`` with respect to its output (the feature Gramian's rows).
    """

    alphas: Tensor | None = None
    r"""
    Golden Pendulum's QP solution :math:`\alpha` per step (its weights on the normalised
    gradients, the quantity its paper reports), ``steps x m``; None for the other methods.
    """


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


_LOADED: dict[tuple[str, int], Workload] = {}
"""The workloads this process has built or was given, by name and seed."""


def load_workload(name: str, seed: int) -> Workload:
    """The workload ``name`` split with ``seed``, built once per process."""

    if (name, seed) not in _LOADED:
        _LOADED[name, seed] = WORKLOADS[name](seed)
    return _LOADED[name, seed]


def start_worker(workloads: dict[tuple[str, int], Workload]) -> None:
    """
    Sets up a worker process: one thread, and the workloads the main process built, so that the
    worker neither imports their packages nor makes their data again.
    """

    torch.set_num_threads(1)
    _LOADED.update(workloads)


def run_job(job: Job) -> Run:
    """Trains what ``job`` names on a fresh network seeded by ``job.seed``."""

    workload = load_workload(job.workload, job.seed)
    device = torch.device(job.device)
    if job.task is not None:
        return _train_single_task(workload, job, job.task, device)
    assert job.method is not None
    method = build_method(job.method, workload, job.steps, device, job.gramian_from)
    return _train_method(workload, job, method, device)


def _train_method(workload: Workload, job: Job, method: Method, device: torch.device) -> Run:
    """
    Trains ``method`` through the step engine, :class:`~torchjd_golden.JacobianDescent` on the
    trunk, with its weights from ``job.gramian_from``.
    """

    if method.gramian_from != job.gramian_from:
        raise ValueError(
            f"The job asks for gramian_from={job.gramian_from!r}, the method was built for "
            f"{method.gramian_from!r}."
        )
    torch.manual_seed(job.seed)
    network = MultiTaskNetwork(workload.train_inputs.shape[1], workload.tasks).to(device)
    aggregator = method.aggregator.to(device)
    step = JacobianDescent(network, aggregator, shared=network.trunk, gramian_from=job.gramian_from)
    optimizer = _adam(network, method.settings.adam_betas)
    inputs, targets = workload.train_inputs.to(device), workload.train_targets.to(device)
    loss_history: list[Tensor] = []
    weight_history: list[Tensor] = []
    alpha_history: list[Tensor] = []
    norm_history: list[Tensor] = []
    hook = _row_norm_reader(step, norm_history)

    with warnings.catch_warnings():
        # cvxpy says at every NashMTL solve that its problem cannot be cached, and now and then
        # that ECOS stopped at its iteration limit (NashMTL then keeps its previous weights).
        warnings.filterwarnings("ignore", message="You are solving a parameterized problem")
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        start = time.perf_counter()
        for batch in _batches(workload, job, device):
            features, outputs = network(inputs[batch])
            # By name: the engine tells a stateful method the tasks, and gives the losses to one
            # that reads them (the adaptive Golden Pendulum).
            losses: dict[Hashable, Tensor] = {
                task.name: task.loss(output, target)
                for task, output, target in zip(
                    workload.tasks, outputs, targets[batch].T, strict=True
                )
            }
            returned = step.backward(losses, features=features)
            optimizer.step()
            optimizer.zero_grad()
            loss_history.append(torch.stack(list(losses.values())).detach())
            applied = applied_weights(aggregator, returned)
            # Copies: a stateful method may update the tensors it returned in place.
            if applied is not None:
                weight_history.append(applied.detach().clone())
            alpha = getattr(aggregator, "alpha", None)
            if isinstance(alpha, Tensor):  # Golden Pendulum's
                alpha_history.append(alpha.detach().clone())
        seconds = (time.perf_counter() - start) / job.steps
    hook.remove()

    # Normalised after the timed loop, so that the time per step is the method's own.
    weights = _stacked(weight_history, job.steps)
    return Run(
        job=job,
        metrics=_evaluate(network, workload, workload.tasks, range(len(workload.tasks)), device),
        seconds_per_step=seconds,
        losses=torch.stack(loss_history).cpu(),
        weights=None if weights is None else weights / weights.abs().sum(dim=1, keepdim=True),
        shares=None if weights is None else update_shares(weights, torch.stack(norm_history).cpu()),
        alphas=_stacked(alpha_history, job.steps),
    )


def _row_norm_reader(step: JacobianDescent, norms: list[Tensor]) -> RemovableHandle:
    """
    Appends to ``norms``, at each step, the norms of the rows the weights are computed from,
    read from the input of the call that computes them (no extra backward pass): the Jacobian
    the aggregator is called on, or with ``"features"`` the feature Gramian its weighting is
    called on (the norms are the square roots of its diagonal).
    """

    if step.gramian_from == "features":
        weighting = gramian_weighting(step.aggregator)

        def read_gramian(_weighting: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            norms.append(inputs[0].detach().diagonal().clamp(min=0).sqrt())

        return weighting.register_forward_pre_hook(read_gramian)

    def read_jacobian(_aggregator: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        norms.append(torch.linalg.vector_norm(inputs[0].detach(), dim=1))

    return step.aggregator.register_forward_pre_hook(read_jacobian)


def applied_weights(aggregator: nn.Module, returned: Tensor | None) -> Tensor | None:
    """
    The weights a method applied to the rows of the Jacobian: those the step returned, or
    for GCond, whose update carries a momentum (it returns none), the weights of its resolved
    gradient before the momentum (``resolution_weights``); ``None`` for a method without.
    """

    if returned is not None:
        return returned
    resolution = getattr(aggregator, "resolution_weights", None)
    return resolution if isinstance(resolution, Tensor) else None


def update_shares(weights: Tensor, row_norms: Tensor) -> Tensor:
    r"""
    Each task's share of the update :math:`\sum_j w_j g_j`: :math:`s_k = |w_k| \|g_k\| / \sum_j
    |w_j| \|g_j\|`, the part of the step's length that task :math:`k`'s gradient contributes
    before the rows add up (the "gradient bandwidth" a task gets), over the last dimension (one
    step, or ``steps x m``). Scale-free in the weights; all zeros when every product is zero.
    """

    contributions = weights.abs() * row_norms
    total = contributions.sum(dim=-1, keepdim=True)
    return contributions / torch.where(total > 0, total, 1.0)


def _stacked(history: Sequence[Tensor], steps: int) -> Tensor | None:
    """
    ``steps x m`` in float32 on the CPU, or None for a quantity the method did not give at every
    step.
    """

    return torch.stack(list(history)).float().cpu() if len(history) == steps else None


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
        shares=None,
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
