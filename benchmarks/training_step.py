"""
A full training step: an MLP with 1.31M shared parameters (256 -> 1024 -> 1024) and 8 linear
heads, batch 128, MSE losses, SGD. Each method through ``mtl_backward`` + ``jac_to_grad`` and,
for the Gramian weightings, through the autogram ``Engine`` (Gramian of the 8 losses, then
``losses.backward(weights)``); against torchjd's Mean on the same path, a plain single-objective
backward of the summed losses, and the reference ``golden_nash_backward``. GCond's
accumulate-and-resolve step against the official ``step()`` is in ``benchmarks.gcond``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from golden_pendulum import golden_nash_backward
from torch import Tensor, nn
from torchjd.aggregation import Mean, MeanWeighting
from torchjd.autogram import Engine
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import (
    GABA,
    ExcessMTL,
    GABAWeighting,
    GCond,
    GoldenPendulum,
    GoldenPendulumWeighting,
)

from .gcond import interleaved_medians

N_TASKS, BATCH = 8, 128


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(1024, 1) for _ in range(N_TASKS)])

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(inputs)
        return features, [head(features)[:, 0] for head in self.heads]


def _setup() -> tuple[Network, torch.optim.Optimizer]:
    torch.manual_seed(0)
    network = Network()
    return network, torch.optim.SGD(network.parameters(), lr=1e-4)


def _losses(outputs: list[Tensor], targets: Tensor) -> list[Tensor]:
    scales = torch.logspace(-1, 2, N_TASKS)  # losses of unequal magnitudes
    return [
        scale * ((o - t) ** 2).mean()
        for scale, o, t in zip(scales, outputs, targets.T, strict=True)
    ]


def autojac_step(
    make: Callable[[], nn.Module], data: tuple[Tensor, Tensor], optimize: bool = False
) -> Callable[[], object]:
    network, optimizer = _setup()
    aggregator = make()
    options = {"optimize_gramian_computation": True} if optimize else {}

    def step() -> None:
        features, outputs = network(data[0])
        mtl_backward(_losses(outputs, data[1]), features=features)
        jac_to_grad(network.trunk.parameters(), aggregator, **options)
        optimizer.step()
        optimizer.zero_grad()

    return step


def autogram_step(
    make: Callable[[], nn.Module], data: tuple[Tensor, Tensor]
) -> Callable[[], object]:
    network, optimizer = _setup()
    engine, weighting = Engine(network, batch_dim=None), make()

    def step() -> None:
        _, outputs = network(data[0])
        losses = torch.stack(_losses(outputs, data[1]))
        losses.backward(weighting(engine.compute_gramian(losses)))
        optimizer.step()
        optimizer.zero_grad()

    return step


def plain_step(data: tuple[Tensor, Tensor]) -> Callable[[], object]:
    network, optimizer = _setup()

    def step() -> None:
        _, outputs = network(data[0])
        sum(_losses(outputs, data[1])).backward()  # type: ignore[union-attr]
        optimizer.step()
        optimizer.zero_grad()

    return step


def golden_nash_step(data: tuple[Tensor, Tensor]) -> Callable[[], object]:
    network, optimizer = _setup()

    def step() -> None:
        _, outputs = network(data[0])
        losses = {f"t{k}": loss for k, loss in enumerate(_losses(outputs, data[1]))}
        golden_nash_backward(losses, network, shared_params=list(network.trunk.parameters()))
        optimizer.step()
        optimizer.zero_grad()

    return step


def step_table(repeat: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    data = (
        torch.randn(BATCH, 256, generator=generator),
        torch.randn(BATCH, N_TASKS, generator=generator),
    )
    functions: dict[str, Callable[[], object]] = {
        "autojac Mean (torchjd)": autojac_step(Mean, data),
        "autojac GoldenPendulum": autojac_step(GoldenPendulum, data),
        "autojac GABA": autojac_step(lambda: GABA(warmup_steps=0), data),
        "autojac GoldenPendulum, optimized Gramian": autojac_step(
            GoldenPendulum, data, optimize=True
        ),
        "autojac GABA, optimized Gramian": autojac_step(
            lambda: GABA(warmup_steps=0), data, optimize=True
        ),
        "autojac ExcessMTL": autojac_step(ExcessMTL, data),
        "autojac GCond": autojac_step(GCond, data),
        "autogram Mean (torchjd)": autogram_step(MeanWeighting, data),
        "autogram GoldenPendulum": autogram_step(GoldenPendulumWeighting, data),
        "autogram GABA": autogram_step(lambda: GABAWeighting(warmup_steps=0), data),
        "plain backward (one objective)": plain_step(data),
        "golden_nash_backward (reference)": golden_nash_step(data),
    }
    medians = interleaved_medians(functions, repeat)
    shared = sum(p.numel() for p in Network().trunk.parameters())
    print(
        f"## Training step, {shared / 1e6:.2f}M shared parameters, {N_TASKS} heads, batch {BATCH}\n"
    )
    print("| step | ms | / Mean on the same path | golden_nash_backward / this |")
    print("|---|---|---|---|")
    reference = medians["golden_nash_backward (reference)"]
    for name, seconds in medians.items():
        path = name.split()[0].rstrip(",")
        baseline = medians.get(f"{path} Mean (torchjd)")
        relative = f"{seconds / baseline:.2f}" if baseline is not None else ""
        print(f"| {name} | {1e3 * seconds:.1f} | {relative} | {reference / seconds:.2f} |")
    print(
        "\nTargets: Golden Pendulum and GABA at most 1.1x Mean's step on the same path, and at "
        "least 1.5x faster than golden_nash_backward. (Optimized Gramian: jac_to_grad with "
        "optimize_gramian_computation=True, which sums the parameters' Gramians instead of "
        "concatenating their Jacobians; Mean cannot use it.)\n"
    )
    return medians
