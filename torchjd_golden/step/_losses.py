"""
What a step is given: the per-task losses (a mapping by task name, a vector, or a sequence) and
the shared features.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from torch import Tensor

TaskLossesInput = Mapping[Hashable, Tensor] | Sequence[Tensor] | Tensor


def task_losses(losses: TaskLossesInput) -> tuple[tuple[Hashable, ...] | None, list[Tensor]]:
    """
    The task names (``None`` for a vector or a sequence: the tasks are known by position) and the
    scalar losses, one per task, of ``losses``.
    """

    names: tuple[Hashable, ...] | None = None
    if isinstance(losses, Mapping):
        names = tuple(losses)
        values = [losses[name] for name in names]
    elif isinstance(losses, Tensor):
        if losses.ndim != 1:
            raise ValueError(
                "Parameter `losses` must be a mapping from task name to scalar loss, or a vector "
                f"of losses (one per task). Found a tensor of shape {tuple(losses.shape)}."
            )
        values = list(losses.unbind())
    elif isinstance(losses, Sequence) and not isinstance(losses, str):
        values = list(losses)
    else:
        raise TypeError(
            "Parameter `losses` must be a mapping from task name to scalar loss, a vector or a "
            f"sequence of scalar losses. Found {type(losses).__name__}."
        )
    if not values:
        raise ValueError("Parameter `losses` holds no task loss.")
    for position, loss in enumerate(values):
        label = repr(names[position]) if names is not None else f"#{position}"
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"The loss of task {label} must be a scalar tensor. Found {loss!r}.")
        if not loss.requires_grad:
            raise ValueError(
                f"The loss of task {label} does not require grad: it depends on no trainable "
                "parameter (was it computed under torch.no_grad(), or detached?)."
            )
    return names, [loss.reshape(()) for loss in values]


def detached_vector(losses: Sequence[Tensor]) -> Tensor:
    """The losses as one detached vector (for the aggregators that read them)."""

    return torch.stack([loss.detach() for loss in losses])


def shared_features(features: Tensor | Sequence[Tensor] | None) -> list[Tensor] | None:
    """The shared features as a list of tensors (``None`` stays ``None``), checked."""

    if features is None:
        return None
    listed = [features] if isinstance(features, Tensor) else list(features)
    if not listed or not all(isinstance(f, Tensor) and f.requires_grad for f in listed):
        raise ValueError(
            "Parameter `features` must be the shared features (a tensor or a sequence of tensors "
            "that require grad: the trunk's output)."
        )
    return listed
