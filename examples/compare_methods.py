"""
Train one small multi-task model per method and compare the per-task losses and weights.

The four synthetic tasks share an MLP trunk; their losses differ by about 300x in magnitude, the
setting of the Golden Pendulum paper. Each method is a torchjd aggregator used the standard way:
``mtl_backward`` on the task losses, then ``jac_to_grad`` on the trunk parameters.

The "share" of a task is its part of the update: :math:`w_k \\|J_k\\| / \\sum_j w_j \\|J_j\\|`
with :math:`w` the weights ``jac_to_grad`` returns, averaged over the last 50 steps. It is
comparable across methods whatever scale their weights live on.

Run: ``python examples/compare_methods.py [--steps N] [--seed S]``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn
from torchjd.aggregation import Aggregator, Mean
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GABA, AdaptiveGoldenPendulum, ExcessMTL, GoldenPendulum

N_TASKS = 4
LOSS_SCALES = torch.tensor([300.0, 1.0, 1.0, 0.01])  # ranking-, classification-, regression-like


def make_data(seed: int, n_samples: int = 2048) -> tuple[Tensor, Tensor]:
    """Inputs and one target column per task; two tasks pull the trunk in opposite directions."""

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_samples, 16, generator=generator)
    directions = torch.randn(16, N_TASKS, generator=generator)
    directions[:, 2] = -directions[:, 0] + 0.3 * directions[:, 2]
    targets = torch.tanh(inputs @ directions) + 0.1 * torch.randn(
        n_samples, N_TASKS, generator=generator
    )
    return inputs, targets


class MultiTaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(N_TASKS)])

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(inputs)
        return features, [head(features).squeeze(1) for head in self.heads]


def train(aggregator: Aggregator, steps: int, seed: int) -> dict[str, object]:
    inputs, targets = make_data(seed)
    torch.manual_seed(seed)
    model = MultiTaskModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    trunk = list(model.trunk.parameters())
    shares = []
    start = time.perf_counter()

    for step in range(steps):
        batch = torch.randint(
            0, inputs.shape[0], (64,), generator=torch.Generator().manual_seed(step)
        )
        features, outputs = model(inputs[batch])
        losses = [
            scale * ((output - target) ** 2).mean()
            for scale, output, target in zip(LOSS_SCALES, outputs, targets[batch].T, strict=True)
        ]
        mtl_backward(losses, features=features)
        norms = torch.stack(
            [torch.cat([p.jac[k].flatten() for p in trunk]).norm() for k in range(N_TASKS)]
        )
        if isinstance(aggregator, AdaptiveGoldenPendulum):
            aggregator.losses = torch.stack(losses)
        weights = jac_to_grad(trunk, aggregator)
        if weights is not None and step >= steps - 50:
            contribution = weights.abs() * norms
            shares.append(contribution / contribution.sum())
        optimizer.step()
        optimizer.zero_grad()

    seconds = (time.perf_counter() - start) / steps
    with torch.no_grad():
        _, outputs = model(inputs)
        final = [float(((o - t) ** 2).mean()) for o, t in zip(outputs, targets.T, strict=True)]
    share = torch.stack(shares).mean(dim=0)
    return {
        "losses": final,
        "share": share.tolist(),
        "balance": float(share.min() / share.max()),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--steps", type=int, default=300, help="training steps per method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model")
    args = parser.parse_args()

    methods: dict[str, Aggregator] = {
        "Mean (torchjd)": Mean(),
        "GoldenPendulum": GoldenPendulum(),
        "AdaptiveGoldenPendulum": AdaptiveGoldenPendulum(),
        "GABA": GABA(warmup_steps=20),
        "ExcessMTL": ExcessMTL(n_warmup_steps=20),
    }
    scales = ", ".join(f"{s:g}" for s in LOSS_SCALES.tolist())
    print(f"{N_TASKS} tasks, loss scales [{scales}], {args.steps} steps\n")
    header = "method                  " + "".join(f"  MSE task {k}" for k in range(N_TASKS))
    print(header + "   update shares (last 50 steps)      balance  ms/step")
    for name, aggregator in methods.items():
        result = train(aggregator, args.steps, args.seed)
        losses = "".join(f"{loss:12.4f}" for loss in result["losses"])  # type: ignore[attr-defined]
        shares = " ".join(f"{s:.3f}" for s in result["share"])  # type: ignore[attr-defined]
        balance, milliseconds = result["balance"], 1e3 * result["seconds"]  # type: ignore[operator]
        print(f"{name:24s}{losses}   {shares}   {balance:7.3f}  {milliseconds:7.2f}")


if __name__ == "__main__":
    main()
