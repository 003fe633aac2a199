"""
GCond: the cost of one aggregation against the floor, and a full training step against the
official implementation.

Part 1, resolve: one ``GCond`` call (cross products with the previous step, resolution, momentum)
against the floor ``J @ J.T`` + ``w @ J``, at (m, n) = (8, 1e6) and (16, 4e6). Each measurement
rotates through distinct Jacobians with conflicting rows, and the floor and ours alternate, so
that neither profits from a cache the other does not get. With ``--reference``, the official
``GradientConductor._project`` on the same Jacobians (slow: about a second per call at m=8).

Part 2, training step: 8 micro-batches of an 8-task MLP with about 1.3M shared parameters and
batch 32: torchjd accumulation (``backward`` per micro-batch, or ``backward_task`` in the
stochastic mode) and one ``jac_to_grad`` with ``GCond``, against the official ``step()`` in the
same mode (with ``--reference``).

The official implementation is not a dependency: ``--reference PATH`` points at a copy of its
``grad_conductor.py`` (https://github.com/AlevLab-dev/GCond, commit 1b0518a).

Run: ``python -m benchmarks.gcond [--reference PATH] [--repeat 7] [--skip-step]``
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import GCond, backward_task

SIZES = [(8, 1_000_000), (16, 4_000_000)]
N_TASKS, N_MICRO_BATCHES, BATCH = 8, 8, 32


def load_reference(path: str | None) -> ModuleType | None:
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("grad_conductor", Path(path))
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conflicting_jacobians(m: int, n: int, count: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(m)
    directions = torch.randn(3, n, generator=generator)
    return [
        torch.randn(m, 3, generator=generator) @ directions
        + 0.3 * torch.randn(m, n, generator=generator)
        for _ in range(count)
    ]


def interleaved_medians(
    functions: dict[str, Callable[[], object]], repeat: int
) -> dict[str, float]:
    """Median seconds of each function, calling them in turn so that drift hits all alike."""

    for function in functions.values():
        function()
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def resolve_table(reference: ModuleType | None, repeat: int) -> None:
    print("## One aggregation call (ms; ratio to the floor J J^T + w J, same run)\n")
    print("| m | n | floor | GCond | GCond / floor | official _project | official / floor |")
    print("|---|---|---|---|---|---|---|")
    for m, n in SIZES:
        jacobians = conflicting_jacobians(m, n, 3)
        functions = {"floor": _floor(jacobians), "ours": rotating(GCond(), jacobians)}
        timings = interleaved_medians(functions, repeat)
        official = "skipped"
        ratio = ""
        if reference is not None:
            seconds = _official_project_seconds(reference, jacobians)
            official, ratio = f"{1e3 * seconds:.0f}", f"{seconds / timings['floor']:.0f}"
        print(
            f"| {m} | {n:.0e} | {1e3 * timings['floor']:.1f} | {1e3 * timings['ours']:.1f} | "
            f"{timings['ours'] / timings['floor']:.2f} | {official} | {ratio} |"
        )
    print()


def rotating(function: Callable[[Tensor], object], jacobians: list[Tensor]) -> Callable[[], object]:
    """One call of ``function`` on the next Jacobian of the rotation."""

    inputs = itertools.cycle(jacobians)
    return lambda: function(next(inputs))


def _floor(jacobians: list[Tensor]) -> Callable[[], object]:
    """``J @ J.T`` and ``w @ J`` on the next Jacobian of the rotation."""

    weights = torch.rand(jacobians[0].shape[0])

    def floor(jacobian: Tensor) -> None:
        _ = jacobian @ jacobian.T
        _ = weights @ jacobian

    return rotating(floor, jacobians)


def official_project(
    reference: ModuleType, m: int, n: int
) -> tuple[Callable[[Tensor], None], Callable[[], object]]:
    """
    The official ``GradientConductor`` for m tasks of n parameters (float32 accumulators): a
    function loading a Jacobian as its accumulated gradients, and its ``_project``.
    """

    model = nn.Linear(n, 1, bias=False)
    names = [f"t{k}" for k in range(m)]
    conductor = reference.GradientConductor(
        model,
        {k: nn.functional.mse_loss for k in names},
        {k: 1.0 for k in names},
        m,
    )

    def load(jacobian: Tensor) -> None:
        for name, row in zip(names, jacobian, strict=True):
            conductor.accumulators[name] = [row.view(1, n).clone()]
        conductor.prev_accumulators = {k: [torch.zeros(1, n)] for k in names}

    return load, conductor._project


def _official_project_seconds(reference: ModuleType, jacobians: list[Tensor]) -> float:
    """Median time of the official ``_project`` on the same Jacobians, loading excluded."""

    load, project = official_project(reference, *jacobians[0].shape)
    timings = []
    for jacobian in jacobians:
        load(jacobian)
        start = time.perf_counter()
        project()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


class MultiTaskMLP(nn.Module):
    """About 1.3M shared parameters and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU()
        )
        self.heads = nn.Linear(1024, N_TASKS)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.heads(self.trunk(inputs))


def step_table(reference: ModuleType | None, repeat: int) -> None:
    torch.manual_seed(0)
    data = [(torch.randn(BATCH, 256), torch.randn(BATCH, N_TASKS)) for _ in range(N_MICRO_BATCHES)]
    shared = sum(p.numel() for p in MultiTaskMLP().trunk.parameters())
    print(
        f"## Training step: {N_MICRO_BATCHES} micro-batches of {BATCH}, {N_TASKS} tasks, "
        f"{shared / 1e6:.2f}M shared parameters (ms)\n"
    )
    print("| mode | torchjd + GCond | official step() | official / ours |")
    print("|---|---|---|---|")
    for stochastic in (False, True):
        functions: dict[str, Callable[[], object]] = {"ours": _our_step(data, stochastic)}
        if reference is not None:
            functions["official"] = _official_step(reference, data, stochastic)
        timings = interleaved_medians(functions, repeat)
        official = f"{1e3 * timings['official']:.0f}" if "official" in timings else "skipped"
        ratio = f"{timings['official'] / timings['ours']:.1f}" if "official" in timings else ""
        mode = "stochastic" if stochastic else "all tasks per micro-batch"
        print(f"| {mode} | {1e3 * timings['ours']:.0f} | {official} | {ratio} |")
    print()


def _our_step(data: list[tuple[Tensor, Tensor]], stochastic: bool) -> Callable[[], object]:
    """torchjd accumulation over the micro-batches, then one ``jac_to_grad`` with GCond."""

    model, gcond = MultiTaskMLP(), GCond()
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=1e-3)
    per_task = N_MICRO_BATCHES // N_TASKS

    def step() -> None:
        for k, (x, y) in enumerate(data):
            if stochastic:
                task = k // per_task
                loss = ((model(x)[:, task] - y[:, task]) ** 2).mean()
                backward_task(loss, task, N_TASKS, scale=1.0 / per_task)
            else:
                backward(((model(x) - y) ** 2).mean(dim=0) / N_MICRO_BATCHES)
        jac_to_grad(parameters, gcond)
        optimizer.step()
        optimizer.zero_grad()

    return step


def _official_step(
    reference: ModuleType, data: list[tuple[Tensor, Tensor]], stochastic: bool
) -> Callable[[], object]:
    model = MultiTaskMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    names = [f"t{k}" for k in range(N_TASKS)]
    losses = {
        name: (lambda out, y, k=k: ((out[:, k] - y[:, k]) ** 2).mean())
        for k, name in enumerate(names)
    }
    conductor = reference.GradientConductor(
        model,
        losses,
        {name: 1.0 for name in names},
        N_MICRO_BATCHES,
        stochastic_accumulation=stochastic,
        freeze_bn=False,
    )
    batches = itertools.cycle(data)

    def step() -> None:
        conductor.step(lambda: next(batches))
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="path to the official grad_conductor.py")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per measurement")
    parser.add_argument("--skip-step", action="store_true", help="only the aggregation table")
    args = parser.parse_args()
    reference = load_reference(args.reference)
    print(f"{torch.get_num_threads()} threads, float32\n")
    resolve_table(reference, args.repeat)
    if not args.skip_step:
        step_table(reference, args.repeat)


if __name__ == "__main__":
    main()
