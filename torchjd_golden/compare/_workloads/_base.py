"""What a workload is: its tasks (loss, metric), its inputs and targets, split in train and test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

TaskKind = Literal["regression", "binary", "multiclass"]


@dataclass(frozen=True)
class Task:
    """
    One head: its loss, its output size and the metric reported on the test set.

    A regression head predicts ``target_mean + target_std * output``: its loss and its metric
    are in the target's own units, so that the loss keeps the target's magnitude, while the head
    learns as on a standardised target (Adam's steps do not depend on the loss's scale).
    """

    name: str
    kind: TaskKind
    n_outputs: int = 1
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def metric(self) -> str:
        return "R2" if self.kind == "regression" else "accuracy"

    def prediction(self, output: Tensor) -> Tensor:
        """A regression head's prediction, in the target's units."""

        return self.target_mean + self.target_std * output[:, 0]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.kind == "regression":
            return ((self.prediction(output) - target) ** 2).mean()
        if self.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(output[:, 0], target)
        return nn.functional.cross_entropy(output, target.long())

    def score(self, output: Tensor, target: Tensor) -> float:
        if self.kind == "regression":
            residual = ((self.prediction(output) - target) ** 2).sum()
            return float(1.0 - residual / ((target - target.mean()) ** 2).sum())
        if self.kind == "binary":
            return float(((output[:, 0] > 0).float() == target).float().mean())
        return float((output.argmax(dim=1) == target.long()).float().mean())


@dataclass(frozen=True)
class Workload:
    """Inputs, one target column per task, and the train/test split."""

    name: str
    description: str
    tasks: tuple[Task, ...]
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    source: str = ""
    """Where the data and its construction come from, with the licence, for the report."""

    def steps_per_epoch(self, batch_size: int) -> int:
        """The number of batches of ``batch_size`` in one pass over the training set."""

        return max(1, self.train_inputs.shape[0] // batch_size)


def split(
    name: str,
    description: str,
    tasks: tuple[Task, ...],
    inputs: Tensor,
    targets: Tensor,
    seed: int,
    source: str,
) -> Workload:
    """The workload with a random fifth of the samples, drawn by ``seed``, held out for testing."""

    test, train = split_indices(inputs.shape[0], seed)
    return Workload(
        name=name,
        description=description,
        tasks=tasks,
        train_inputs=inputs[train],
        train_targets=targets[train],
        test_inputs=inputs[test],
        test_targets=targets[test],
        source=source,
    )


def split_indices(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """The test and the training indices of ``n`` samples, a random fifth held out by ``seed``."""

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return order[: n // 5], order[n // 5 :]
