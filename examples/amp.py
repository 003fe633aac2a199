"""
Mixed precision with a GradScaler: torchjd's documented pattern against ``with_grad_scaler``, for
Golden Pendulum, whose output does not scale with the loss scale (see docs/guides/amp.rst).

Run: ``python examples/amp.py [--steps N]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.amp import GradScaler
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GoldenPendulum, with_grad_scaler


def train(steps: int, scaling: str) -> float:
    """Final mean loss; ``scaling`` is "none", "plain" (torchjd's pattern) or "wrapped"."""

    torch.manual_seed(0)
    trunk, heads = (
        nn.Sequential(nn.Linear(10, 32), nn.ReLU()),
        nn.ModuleList([nn.Linear(32, 1) for _ in range(2)]),
    )
    parameters = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**10, enabled=scaling != "none")
    golden = GoldenPendulum()
    aggregator = with_grad_scaler(golden, scaler) if scaling == "wrapped" else golden
    inputs = torch.randn(256, 10)
    targets = torch.stack([inputs[:, 0], inputs[:, 1]], dim=1)
    for _ in range(steps):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            features = trunk(inputs)
            outputs = [head(features).float()[:, 0] for head in heads]
        losses = [((o - t) ** 2).mean() for o, t in zip(outputs, targets.T, strict=True)]
        mtl_backward(scaler.scale(losses) if scaler.is_enabled() else losses, features=features)
        jac_to_grad(trunk.parameters(), aggregator)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return sum(loss.item() for loss in losses) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    for scaling in ("none", "plain", "wrapped"):
        label = {
            "none": "no loss scaling",
            "plain": "GradScaler, plain",
            "wrapped": "GradScaler, with_grad_scaler",
        }[scaling]
        print(f"{label:32s} final loss {train(args.steps, scaling):.4f}")


if __name__ == "__main__":
    main()
