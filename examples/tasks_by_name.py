"""
Tasks by name: a stateful aggregator told which task each row is keeps each task's state through
batches that lack some tasks, a task joining mid-training, and a new order of the rows (see
docs/guides/tasks_by_name.rst).

Three datasets share a backbone; a batch comes from one or two of them, so only their tasks have
labels. The script trains the same model twice with GABA: once with names (the state of a task
that sits out waits for it) and once without (every change of the task set resets the state,
with a warning), and prints each task's averaged weight as the run goes. Then it checks, on
GABA's weighting alone, that naming the rows makes the result independent of their order.

Run: ``python examples/tasks_by_name.py [--steps N]``
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GABA, GABAWeighting

TASKS = ["depth", "segmentation", "normals", "edges"]
# Which tasks each dataset labels; "edges" only arrives with the third dataset, mid-training.
DATASETS = [["depth", "segmentation"], ["segmentation", "normals"], ["depth", "normals", "edges"]]


def train(steps: int, *, names: bool) -> tuple[GABA, int]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(10, 32), nn.Tanh())
    heads = nn.ModuleDict({task: nn.Linear(32, 1) for task in TASKS})
    optimizer = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=1e-2)
    targets = {task: torch.randn(10) * 10.0**k for k, task in enumerate(TASKS)}
    aggregator = GABA(warmup_steps=0)
    resets = 0
    for step in range(steps):
        dataset = DATASETS[step % 2] if step < steps // 2 else DATASETS[step % 3]
        inputs = torch.randn(64, 10)
        features = backbone(inputs)
        losses = [
            (heads[task](features)[:, 0] - inputs @ targets[task]).pow(2).mean() for task in dataset
        ]
        if names:
            aggregator.tasks = dataset  # the names of this step's rows
        mtl_backward(losses, features=features)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jac_to_grad(backbone.parameters(), aggregator)
        resets += sum("reset" in str(warning.message) for warning in caught)
        optimizer.step()
        optimizer.zero_grad()
    return aggregator, resets


def order_free() -> float:
    """Largest difference between a named call and the same call with its rows reversed."""

    jacobian = torch.randn(4, 50)
    forward, backward = GABAWeighting(warmup_steps=0), GABAWeighting(warmup_steps=0)
    forward.tasks, backward.tasks = TASKS, TASKS[::-1]
    difference = 0.0
    for _ in range(5):
        step = jacobian + 0.1 * torch.randn(4, 50)
        weights, reversed_weights = forward(step @ step.T), backward(step.flip(0) @ step.flip(0).T)
        difference = max(difference, float((weights - reversed_weights.flip(0)).abs().max()))
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    named, named_resets = train(args.steps, names=True)
    state = named.gramian_weighting.ema_weights.tolist()  # one row per known task
    averages = dict(zip(named.known_tasks or (), state, strict=True))
    print(
        f"with names: {named_resets} resets; each task's averaged weight after {args.steps} steps"
        " (renormalised over the tasks of a call when it takes part):"
    )
    for task, weight in averages.items():
        print(f"    {task:13s} {weight:.3f}")
    _, anonymous_resets = train(args.steps, names=False)
    print(
        f"without names: {anonymous_resets} resets (one per change in the number of rows; between "
        "them, row k's state served whichever task came k-th)"
    )
    difference = order_free()
    print(f"rows reversed with their names: weights differ by {difference:.1e} (float32 rounding)")


if __name__ == "__main__":
    main()
