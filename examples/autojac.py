"""
Every method of torchjd-golden through autojac: ``mtl_backward`` on the task losses, then
``jac_to_grad`` on the shared parameters (see docs/guides/autojac.rst).

Run: ``python examples/autojac.py [--steps N]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GABA, AdaptiveGoldenPendulum, ExcessMTL, GCond, GoldenPendulum


def train(aggregator: nn.Module, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(10, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(3)])
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-2)
    inputs = torch.randn(512, 10)
    targets = torch.stack([100 * inputs[:, 0], inputs[:, 1] - inputs[:, 0], 0.1 * inputs[:, 2]], 1)
    totals = []
    for _ in range(steps):
        features = trunk(inputs)
        losses = [
            ((h(features)[:, 0] - t) ** 2).mean() for h, t in zip(heads, targets.T, strict=True)
        ]
        totals.append(
            sum(loss.item() / t.var().item() for loss, t in zip(losses, targets.T, strict=True))
        )
        if isinstance(aggregator, AdaptiveGoldenPendulum):
            aggregator.losses = torch.stack(losses).detach()  # its extra input
        mtl_backward(losses, features=features)
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
    return totals[0], totals[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print("method                  relative loss: first -> last")
    for aggregator in (
        GoldenPendulum(),
        AdaptiveGoldenPendulum(),
        GABA(warmup_steps=20),
        ExcessMTL(),
        GCond(),
    ):
        first, last = train(aggregator, args.steps)
        print(f"{aggregator!s:24s}{first:8.3f} -> {last:.3f}")


if __name__ == "__main__":
    main()
