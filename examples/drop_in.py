"""
Coming from golden-pendulum-mtl: a training script written for ``golden_pendulum`` runs with
``torchjd_golden.golden_pendulum`` after changing one import, and gives the same weights and
gradients (see docs/guides/coming_from_golden_pendulum.rst).

Run: ``python examples/drop_in.py [--steps N]``
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

import torch
from torch import nn

TASKS = {"returns": 300.0, "rank": 20.0, "volatility": 1.0, "regime": 0.01}


def train(golden_pendulum: ModuleType, steps: int) -> tuple[list[dict[str, float]], list[float]]:
    """A script of golden-pendulum-mtl's README, given the module to import."""

    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Linear(8, 32), nn.Tanh()),
            "heads": nn.ModuleDict({name: nn.Linear(32, 1) for name in TASKS}),
        }
    ).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    balancer = golden_pendulum.GoldenPendulumMTL(n_tasks=len(TASKS), lam=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs = torch.randn(64, 8, generator=generator, dtype=torch.float64)
        features = model["backbone"](inputs)
        losses = {
            name: scale * (model["heads"][name](features)[:, 0] - inputs[:, k]).pow(2).mean()
            for k, (name, scale) in enumerate(TASKS.items())
        }
        optimizer.zero_grad()
        balancer.backward(losses, model)  # replaces loss.backward()
        optimizer.step()
    gradient = [float(p.grad.norm()) for p in model.parameters() if p.grad is not None]
    return balancer.weight_history, gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    ours = importlib.import_module("torchjd_golden.golden_pendulum")  # was: golden_pendulum
    history, gradient = train(ours, args.steps)
    print(f"torchjd_golden.golden_pendulum: last weights {history[-1]}")
    try:
        reference = importlib.import_module("golden_pendulum")
    except ImportError:
        print("golden-pendulum-mtl is not installed: nothing to compare with")
        return
    their_history, their_gradient = train(reference, args.steps)
    worst = max(
        abs(mine[name] - theirs[name]) / abs(theirs[name])
        for mine, theirs in zip(history, their_history, strict=True)
        for name in theirs
    )
    worst_gradient = max(abs(a - b) / abs(b) for a, b in zip(gradient, their_gradient, strict=True))
    print(
        f"against golden_pendulum over {args.steps} steps: weights within {worst:.1e}, "
        f"gradient norms within {worst_gradient:.1e} (relative)"
    )


if __name__ == "__main__":
    main()
