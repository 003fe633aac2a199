"""
A curriculum: two phases with their own tasks, backbone freezing, lambda and learning-rate
warm-up, one stateful aggregator keyed by task names across phases, the learning rate applied
to the optimizer, and a checkpoint taken mid-phase that resumes identically (see
docs/guides/curriculum.rst).

Run: ``python examples/curriculum.py [--steps N]``
"""

from __future__ import annotations

import argparse
import io

import torch
from torch import nn

from torchjd_golden import Curriculum, DynamicK, Phase, TaskGroup

TASKS = ["returns", "rank", "vol", "mae", "regime"]


def make_run(steps: int) -> tuple[nn.ModuleDict, torch.optim.Optimizer, Curriculum]:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Linear(6, 32), nn.Tanh()),
            "heads": nn.ModuleDict({name: nn.Linear(32, 1) for name in TASKS}),
        }
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    phases = [
        Phase("A_ranking", {"returns", "rank", "vol"}, steps=steps, lam=0.5, lr=0.05,
              warmup_steps=3),
        Phase("B_risk", {"vol", "mae", "regime"}, steps=steps, freeze_backbone=True, lam=0.3,
              lr=0.1, warmup_steps=2),
    ]  # fmt: skip
    aggregator = DynamicK([TaskGroup("risk", ["vol", "mae"])])
    curriculum = Curriculum(
        phases, aggregator, model=model, backbone=model["backbone"], optimizer=optimizer
    )
    return model, optimizer, curriculum


def train(
    model: nn.ModuleDict, optimizer: torch.optim.Optimizer, curriculum: Curriculum, steps: int
) -> list[str]:
    lines = []
    for _ in range(steps):
        generator = torch.Generator().manual_seed(curriculum.global_step)  # the step's batch
        inputs = torch.randn(64, 6, generator=generator)
        features = model["backbone"](inputs)
        losses = {
            name: (head(features)[:, 0] - inputs[:, k]).pow(2).mean()
            for k, (name, head) in enumerate(model["heads"].items())
        }
        weights = curriculum.backward(losses)  # only the phase's tasks count
        lines.append(
            f"{curriculum.global_step:4d}  {curriculum.current_phase_name:10s}"
            f"{optimizer.param_groups[0]['lr']:8.4f}  "
            f"{'frozen' if not model['backbone'][0].weight.requires_grad else 'trained':8s}"
            f"{ {name: round(float(w), 3) for name, w in weights.items()} }"
        )
        optimizer.step()
        optimizer.zero_grad()
        curriculum.step()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per phase")
    args = parser.parse_args()

    model, optimizer, curriculum = make_run(args.steps)
    print("step  phase          lr  backbone  weights")
    uninterrupted = train(model, optimizer, curriculum, 2 * args.steps)
    print("\n".join(uninterrupted))

    # The same run, stopped in the middle of phase B and resumed from a checkpoint.
    model, optimizer, curriculum = make_run(args.steps)
    first = train(model, optimizer, curriculum, args.steps + 1)
    checkpoint = io.BytesIO()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state | {"curriculum": curriculum.state_dict()}, checkpoint)
    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=True)
    model, optimizer, curriculum = make_run(args.steps)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    curriculum.load_state_dict(saved["curriculum"])
    rest = train(model, optimizer, curriculum, args.steps - 1)
    print(f"resumed mid-phase: {'identical' if first + rest == uninterrupted else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
