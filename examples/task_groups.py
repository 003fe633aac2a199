"""
Task groups with DynamicK: Golden Pendulum within groups of named tasks and golden-ratio weights
across them, with groups given by hand or found by gradient similarity, and tasks joining and
leaving during training (see docs/guides/task_groups.rst).

Run: ``python examples/task_groups.py [--steps N]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import DynamicK, TaskGroup

TASKS = ["returns", "rank", "quality", "vol", "mae", "kelly", "regime", "calibration"]


def train(aggregator: DynamicK, steps: int, *, late_task: str | None = None) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(12, 64), nn.Tanh())
    heads = nn.ModuleDict({name: nn.Linear(64, 1) for name in TASKS})
    optimizer = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=3e-3)
    # Three families of targets: the tasks of a family have nearly the same direction.
    families = torch.randn(3, 12)
    directions = families[torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])] + 0.3 * torch.randn(8, 12)
    for step in range(steps):
        inputs = torch.randn(128, 12)
        features = backbone(inputs)
        present = [t for t in TASKS if t != late_task or step >= steps // 2]  # a task joins
        losses = [
            (10.0 ** (k % 3)) * (heads[t](features)[:, 0] - inputs @ directions[k]).pow(2).mean()
            for k, t in enumerate(TASKS)
            if t in present
        ]
        aggregator.tasks = present  # the names of this step's rows
        mtl_backward(losses, features=features)
        jac_to_grad(backbone.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()


def describe(aggregator: DynamicK) -> str:
    groups = [f"{g.name}{list(g.tasks)}" for g in aggregator.active_groups]
    weights = {g: round(w, 3) for g, w in aggregator.group_weights.items()}
    return f"groups {', '.join(groups)}\n    group weights {weights}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    manual = DynamicK(
        groups=[
            TaskGroup("ranking", ["returns", "rank", "quality"]),
            TaskGroup("risk", ["vol", "mae", "kelly"], lam=0.3),
        ]
    )
    train(manual, args.steps, late_task="calibration")
    print("manual groups (calibration joined half-way, in the catch-all group):")
    print("   ", describe(manual))
    manual.add_task("calibration", "meta")
    manual.add_task("regime", "meta")
    train(manual, 2)
    print("after add_task('calibration', 'meta') and add_task('regime', 'meta'):")
    print("   ", describe(manual))

    automatic = DynamicK(auto_group=True, regroup_every=10, similarity_threshold=0.2)
    train(automatic, args.steps)
    print("groups found by gradient similarity (regrouped every 10 steps):")
    print("   ", describe(automatic))

    blocks = sum(len(g.tasks) ** 2 for g in manual.active_groups)
    print(
        f"inner products of gradients per step: {blocks} Gramian entries for the groups above, "
        f"against {len(TASKS) ** 2} for all pairs"
    )


if __name__ == "__main__":
    main()
