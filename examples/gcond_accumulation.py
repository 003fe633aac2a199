"""
GCond's accumulate-then-resolve training, in both accumulation modes.

A three-task regression shares an MLP trunk. Each optimizer step accumulates the tasks' gradients
over several micro-batches in torchjd's ``.jac`` fields, then one ``jac_to_grad`` with ``GCond``
resolves the conflicts and writes the bias-corrected momentum into ``.grad``.

- all tasks: every micro-batch computes the three losses (``backward`` on the vector of losses);
- stochastic: each micro-batch computes one task's loss, which ``backward_task`` adds to that
  task's row only, so a step costs a third of the backward passes.

Run: ``python examples/gcond_accumulation.py [--steps N] [--micro-batches K]``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import GCond, backward_task

N_TASKS = 3


def make_data(seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4096, 10, generator=generator)
    directions = torch.randn(10, N_TASKS, generator=generator)
    directions[:, 1] = -directions[:, 0] + 0.5 * directions[:, 1]  # tasks 0 and 1 conflict
    return inputs, torch.tanh(inputs @ directions) * torch.tensor([1.0, 1.0, 10.0])


def train(
    stochastic: bool, steps: int, micro_batches: int, seed: int = 0
) -> tuple[list[float], float]:
    inputs, targets = make_data(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, N_TASKS))
    gcond = GCond()
    # GCond's update carries the momentum: no first moment in the optimizer.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.0, 0.95))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()

    for _ in range(steps):
        for k in range(micro_batches):
            batch = torch.randint(0, inputs.shape[0], (64,), generator=generator)
            x, y = inputs[batch], targets[batch]
            if stochastic:
                task = k % N_TASKS
                per_task = micro_batches // N_TASKS
                loss = ((model(x)[:, task] - y[:, task]) ** 2).mean()
                backward_task(loss, task, N_TASKS, scale=1.0 / per_task)
            else:
                backward(((model(x) - y) ** 2).mean(dim=0) / micro_batches)
        jac_to_grad(model.parameters(), gcond)
        optimizer.step()
        optimizer.zero_grad()

    seconds = (time.perf_counter() - start) / steps
    with torch.no_grad():
        mse = ((model(inputs) - targets) ** 2).mean(dim=0).tolist()
    return mse, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per mode")
    parser.add_argument("--micro-batches", type=int, default=6, help="micro-batches per step")
    args = parser.parse_args()
    if args.micro_batches % N_TASKS:
        parser.error(f"--micro-batches must be a multiple of {N_TASKS} for the stochastic mode")

    print(f"{N_TASKS} tasks, {args.micro_batches} micro-batches per step, {args.steps} steps\n")
    print("mode          MSE per task                      ms/step")
    for stochastic in (False, True):
        mse, seconds = train(stochastic, args.steps, args.micro_batches)
        losses = "  ".join(f"{value:8.4f}" for value in mse)
        print(f"{'stochastic' if stochastic else 'all tasks':12s}  {losses}   {1e3 * seconds:7.2f}")


if __name__ == "__main__":
    main()
