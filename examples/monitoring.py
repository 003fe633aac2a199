"""
Monitoring a training run: conflict diagnostics of the Gramian each step, and the weights of two
methods (ours and torchjd's) logged by a forward hook to JSON lines and TensorBoard (see
docs/guides/monitoring.rst).

Run: ``python examples/monitoring.py [--steps N] [--output DIR]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchjd.aggregation import UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GoldenPendulum, WeightLogger, gramian_diagnostics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    output = args.output or Path(tempfile.mkdtemp())
    output.mkdir(parents=True, exist_ok=True)

    for aggregator in (GoldenPendulum(), UPGrad()):
        torch.manual_seed(0)
        trunk, heads = (
            nn.Sequential(nn.Linear(10, 32), nn.ReLU()),
            [nn.Linear(32, 1) for _ in range(3)],
        )
        optimizer = torch.optim.Adam(
            [*trunk.parameters(), *(p for h in heads for p in h.parameters())], lr=1e-2
        )
        inputs = torch.randn(256, 10)
        targets = torch.stack(
            [inputs[:, 0], -inputs[:, 0] + 0.3 * inputs[:, 1], 10 * inputs[:, 2]], 1
        )
        name = str(aggregator)
        logger = WeightLogger(
            output / f"{name}.jsonl",
            tasks=["x0", "x1-x0", "x2"],
            tensorboard_dir=output / name,
            every=5,
            diagnostics=True,
        )
        logger.attach(aggregator)
        conflicts = []
        for _ in range(args.steps):
            features = trunk(inputs)
            losses = [
                ((h(features)[:, 0] - t) ** 2).mean() for h, t in zip(heads, targets.T, strict=True)
            ]
            mtl_backward(losses, features=features)
            jacobian = torch.cat([p.jac.flatten(1) for p in trunk.parameters()], dim=1)
            conflicts.append(
                gramian_diagnostics(jacobian @ jacobian.T).conflict_ratio
            )  # stays a tensor
            jac_to_grad(trunk.parameters(), aggregator)
            optimizer.step()
            optimizer.zero_grad()
        logger.close()
        last = json.loads((output / f"{name}.jsonl").read_text().splitlines()[-1])
        mean_conflict = float(torch.stack(conflicts).mean())  # read once, at the end
        print(
            f"{name:16s} mean conflict ratio {mean_conflict:.3f}, last logged weights "
            f"{ {task: round(w, 3) for task, w in last['weights'].items()} }, "
            f"balance {last['balance_ratio']:.3f}"
            + (f", alpha balance {last['alpha_balance_ratio']:.3f}" if "alpha" in last else "")
        )
    print(f"JSON lines and TensorBoard event files in {output}")


if __name__ == "__main__":
    main()
