"""
One training script, the method picked by a config file: change the `aggregator` line to swap.

    python examples/config_swap.py  # examples/configs/golden_pendulum.yaml
    python examples/config_swap.py examples/configs/upgrad.yaml

The config holds an ``aggregator`` entry (a name, or a mapping with ``name`` and keyword
arguments) that ``aggregator_from_config`` turns into any of this package's or torchjd's
aggregators, plus the training settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from torch import nn
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import aggregator_from_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "golden_pendulum.yaml"


def train(config: dict) -> tuple[str, float, float]:
    aggregator = aggregator_from_config(config["aggregator"])
    torch.manual_seed(config.get("seed", 0))
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(3)])
    parameters = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=config.get("lr", 0.05))
    inputs = torch.randn(256, 8)
    targets = torch.stack([inputs[:, 0], -inputs[:, 0] + inputs[:, 1], 10 * inputs[:, 2]], dim=1)

    history = []
    for _ in range(config.get("steps", 100)):
        features = trunk(inputs)
        losses = [
            ((head(features)[:, 0] - target) ** 2).mean()
            for head, target in zip(heads, targets.T, strict=True)
        ]
        history.append(sum(loss.item() for loss in losses))
        mtl_backward(losses, features=features)
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
    return repr(aggregator), history[0], history[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "config",
        type=Path,
        nargs="?",
        default=DEFAULT_CONFIG,
        help="a YAML config file (default: examples/configs/golden_pendulum.yaml)",
    )
    args = parser.parse_args()
    description, first, last = train(yaml.safe_load(args.config.read_text()))
    print(f"aggregator: {description}")
    print(f"total loss: {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
