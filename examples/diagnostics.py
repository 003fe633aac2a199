"""
Diagnostics of a training run from the Gramians its aggregator computes: conflict ratio and
pairs, gradient norm ratio, balance, deviation from the golden targets, resonance and alerts,
kept on the device until read, without the extra backward pass per task that
golden-pendulum-mtl's DiagnosticsEngine takes (see docs/guides/diagnostics.rst).

Run: ``python examples/diagnostics.py [--steps N]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import ConflictMonitor, GoldenPendulum

TASKS = {"price": 300.0, "spread": 1.0, "volume": 0.1, "risk": 5.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
    heads = nn.ModuleDict({name: nn.Linear(32, 1) for name in TASKS})
    optimizer = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=1e-2)
    aggregator = GoldenPendulum(lam=0.2)
    monitor = ConflictMonitor(window_size=200, tasks=list(TASKS))
    monitor.attach(aggregator)  # records each call's Gramian and QP weights

    directions = torch.randn(len(TASKS), 8) * torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1)
    for step in range(args.steps):
        inputs = torch.randn(64, 8)
        features = backbone(inputs)
        losses = [
            scale * (heads[name](features)[:, 0] - inputs @ directions[k]).pow(2).mean()
            for k, (name, scale) in enumerate(TASKS.items())
        ]
        mtl_backward(losses, features=features)
        jac_to_grad(backbone.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 19:
            print(monitor.summary())  # reads the last 10 steps from the device

    report = monitor.report()
    print(f"last step: {report.step}, conflict ratio {report.conflict_ratio:.3f}")
    print(f"conflicting pairs: {[(i, j, round(c, 3)) for i, j, c in report.conflict_pairs]}")
    print(f"gradient norms: { {k: round(v, 3) for k, v in report.gradient_norms.items()} }")
    print(f"deviation from the golden targets {report.weight_deviation:.4f}, "
          f"resonance {report.resonance_score:.3f}")  # fmt: skip
    history = monitor.history()  # tensors on the device, e.g. for a plot
    print(f"mean conflict ratio over the window: {float(history['conflict_ratio'].mean()):.3f}")


if __name__ == "__main__":
    main()
