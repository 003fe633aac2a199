"""The multi-task problems ``torchjd-golden compare`` trains on; nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

TaskKind = Literal["regression", "binary", "multiclass"]


@dataclass(frozen=True)
class Task:
    """One head: its loss, its output size and the metric reported on the test set."""

    name: str
    kind: TaskKind
    n_outputs: int = 1

    @property
    def metric(self) -> str:
        return "R2" if self.kind == "regression" else "accuracy"

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.kind == "regression":
            return ((output[:, 0] - target) ** 2).mean()
        if self.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(output[:, 0], target)
        return nn.functional.cross_entropy(output, target.long())

    def score(self, output: Tensor, target: Tensor) -> float:
        if self.kind == "regression":
            residual = ((output[:, 0] - target) ** 2).sum()
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

    def steps_per_epoch(self, batch_size: int) -> int:
        """The number of batches of ``batch_size`` in one pass over the training set."""

        return max(1, self.train_inputs.shape[0] // batch_size)


def synthetic(seed: int) -> Workload:
    """
    Four heads on shared features, the setting of the Golden Pendulum paper: losses of about
    200 (ranking), 0.69 (classification), 0.6 (regression) and 1 (a hedge that pulls against
    the ranking), a disparity of about 300x.
    """

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4096, 16, generator=generator)
    a, b, c, d = torch.randn(4, 16, generator=generator)
    a, d = a / a.norm(), d / d.norm()
    noise = 0.1 * torch.randn(4096, 4, generator=generator)
    targets = torch.stack(
        [
            14.0 * (inputs @ a) + noise[:, 0],
            ((inputs @ b) > 0).float(),
            0.8 * torch.tanh(inputs @ c / 4.0) + noise[:, 2],
            -(inputs @ a) + 0.5 * (inputs @ d) + noise[:, 3],
        ],
        dim=1,
    )
    tasks = (
        Task("ranking", "regression"),
        Task("classification", "binary"),
        Task("regression", "regression"),
        Task("hedge", "regression"),
    )
    return _split(
        "synthetic", "4 heads, losses ~200 / 0.69 / 0.6 / 1", tasks, inputs, targets, seed
    )


def digits(seed: int) -> Workload:
    """
    scikit-learn's bundled 8x8 digits (1797 images) as three tasks: the class (10-way), the
    parity, and the size of the digit as a number (regression, losses of about 30).
    """

    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - an optional dependency
    except ImportError as error:
        raise ImportError(
            "The digits workload needs scikit-learn: pip install 'torchjd-golden[compare]'."
        ) from error
    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.float32)
    targets = torch.stack([labels, labels.remainder(2.0), labels], dim=1)
    tasks = (Task("class", "multiclass", 10), Task("parity", "binary"), Task("size", "regression"))
    return _split(
        "digits",
        "scikit-learn's 8x8 digits as class, parity and size",
        tasks,
        inputs,
        targets,
        seed,
    )


WORKLOADS = {"synthetic": synthetic, "digits": digits}


def _split(
    name: str, description: str, tasks: tuple[Task, ...], inputs: Tensor, targets: Tensor, seed: int
) -> Workload:
    order = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    test = order[: inputs.shape[0] // 5]
    train = order[inputs.shape[0] // 5 :]
    return Workload(
        name=name,
        description=description,
        tasks=tasks,
        train_inputs=inputs[train],
        train_targets=targets[train],
        test_inputs=inputs[test],
        test_targets=targets[test],
    )
