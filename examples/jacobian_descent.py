"""
The step engine on one process: :class:`~torchjd_golden.JacobianDescent` with each source of
weights, eager and compiled, against torchjd's own ``mtl_backward`` and ``jac_to_grad`` (see
docs/guides/training_at_scale.rst).

Run: ``python examples/jacobian_descent.py [--steps S] [--compile]``
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import Tensor, nn
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GoldenPendulum, JacobianDescent

TASKS = ("depth", "normals", "segmentation", "edges")


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(64, 1) for name in TASKS})

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(inputs)
        return features, {
            name: (10.0**k) * (head(features)[:, 0] - targets[:, k]).pow(2).mean()
            for k, (name, head) in enumerate(self.heads.items())
        }


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(steps):
        inputs = torch.randn(64, 16, generator=generator)
        data.append((inputs, torch.tanh(inputs[:, : len(TASKS)] + inputs[:, 4:8])))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="compile the trunk and the heads")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = Network()
    data = batches(args.steps)

    # torchjd's own step, the reference of the exact source.
    reference = copy.deepcopy(original)
    optimizer = torch.optim.SGD(reference.parameters(), lr=1e-3)
    aggregator = GoldenPendulum()
    for inputs, targets in data:
        features, losses = reference(inputs, targets)
        mtl_backward(list(losses.values()), features=features)
        jac_to_grad(list(reference.trunk.parameters()), aggregator)
        optimizer.step()
        optimizer.zero_grad()

    print(
        "source       ms/step  last weights                    max relative difference to torchjd"
    )
    for source in ("parameters", "features"):
        network = copy.deepcopy(original)
        if args.compile:  # in parts: the features stay an intermediate of the losses' graph
            for part in (network.trunk, *network.heads.values()):
                part.compile()
        engine = JacobianDescent(
            network, GoldenPendulum(), shared=network.trunk, gramian_from=source
        )
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
        start = time.perf_counter()
        for inputs, targets in data:
            features, losses = network(inputs, targets)
            weights = engine.backward(losses, features=features)
            optimizer.step()
            optimizer.zero_grad()
        milliseconds = 1e3 * (time.perf_counter() - start) / args.steps
        with torch.no_grad():
            difference = max(
                float((p - q).abs().max() / q.abs().max())
                for p, q in zip(network.parameters(), reference.parameters(), strict=True)
            )
        shown = ", ".join(f"{w:.3g}" for w in weights.tolist())  # type: ignore[union-attr]
        print(f"{source:12s} {milliseconds:7.1f}  [{shown:30s}]  {difference:.1e}")
    print(
        "parameters is torchjd's step (difference at rounding); features weights the feature "
        "Gramian, an approximation of the weights"
    )


if __name__ == "__main__":
    main()
