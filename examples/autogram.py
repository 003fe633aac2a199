"""
Gramian weightings with torchjd's autogram ``Engine``: the engine computes the Gramian of the
losses without the Jacobian, the weighting turns it into weights, and ``losses.backward(weights)``
applies them (see docs/guides/autogram.rst). Checks that the update equals autojac's.

Run: ``python examples/autogram.py [--steps N]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torchjd.aggregation import GramianWeightedAggregator
from torchjd.autogram import Engine
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import GABAWeighting, GoldenPendulumWeighting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    for make in (GoldenPendulumWeighting, lambda: GABAWeighting(warmup_steps=10)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        twin = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        twin.load_state_dict(model.state_dict())
        engine, weighting = Engine(model, batch_dim=None), make()
        aggregator = GramianWeightedAggregator(make())
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, twin)]
        generator = torch.Generator().manual_seed(1)
        largest_gap = 0.0
        for _ in range(args.steps):
            inputs, targets = (
                torch.randn(32, 10, generator=generator),
                torch.randn(32, 3, generator=generator),
            )
            losses = ((model(inputs) - targets) ** 2).mean(dim=0) * torch.tensor([100.0, 1.0, 0.01])
            losses.backward(weighting(engine.compute_gramian(losses)))
            backward(((twin(inputs) - targets) ** 2).mean(dim=0) * torch.tensor([100.0, 1.0, 0.01]))
            jac_to_grad(twin.parameters(), aggregator)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
            gaps = [
                (p - q).abs().max().item()
                for p, q in zip(model.parameters(), twin.parameters(), strict=True)
            ]
            largest_gap = max(largest_gap, *gaps)
        name = type(weighting).__name__
        gap = f"{largest_gap:.2e}"
        print(
            f"{name:24s} engine vs autojac, largest parameter gap after {args.steps} steps: {gap}"
        )


if __name__ == "__main__":
    main()
