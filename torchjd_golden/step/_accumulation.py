"""Accumulating one task's gradient into its own row of torchjd's ``.jac`` fields."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def backward_task(
    loss: Tensor,
    task: int,
    n_tasks: int,
    *,
    scale: float = 1.0,
    inputs: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
) -> None:
    r"""
    Adds ``scale`` times the gradient of the scalar ``loss`` of one task to row ``task`` of the
    ``.jac`` fields of ``inputs`` (creating :math:`m`-row fields of zeros where there are none):
    the same result as torchjd's ``backward(loss, jac_tensors=scale * one_hot(task, n_tasks))``,
    with one backward pass instead of :math:`m` (the other rows of that call are zeros).

    This is the *stochastic* accumulation of GCond, where each micro-batch computes a single
    task's loss: after a cycle in which every task got :math:`s` micro-batches with ``scale=1/s``,
    row :math:`k` of the accumulated Jacobian is task :math:`k`'s averaged gradient, ready for one
    ``jac_to_grad``. It mixes freely with torchjd's ``backward`` and ``mtl_backward``, which add
    to the same fields.

    :param loss: The task's loss, a scalar.
    :param task: The index of the task, in ``[0, n_tasks)``.
    :param n_tasks: The number of tasks :math:`m`, i.e. of rows of the Jacobian.
    :param scale: The factor applied to the gradient (e.g. one over the number of micro-batches
        the task gets).
    :param inputs: The tensors whose ``.jac`` receive the row; by default, as for torchjd's
        ``backward``, the leaf tensors that require grad and that the loss depends on.
    :param retain_graph: Whether to keep the graph for another backward pass.
    """

    if loss.numel() != 1:
        raise ValueError(f"Parameter `loss` must be a scalar. Found shape {tuple(loss.shape)}.")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(
            f"Parameter `n_tasks` must be a positive integer. Found n_tasks={n_tasks!r}."
        )
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < n_tasks:
        raise ValueError(
            f"Parameter `task` must be an integer in [0, {n_tasks}). Found task={task!r}."
        )
    targets = list(inputs) if inputs is not None else _leaf_tensors(loss)
    for tensor in targets:
        if not (tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)):
            raise ValueError(
                "Cannot populate the .jac field of a tensor that does not satisfy "
                "`tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)`."
            )
    gradients = torch.autograd.grad(
        loss.reshape(()), targets, retain_graph=retain_graph, allow_unused=True
    )
    for tensor, maybe_gradient in zip(targets, gradients, strict=True):
        gradient = torch.zeros_like(tensor) if maybe_gradient is None else maybe_gradient
        jacobian = getattr(tensor, "jac", None)
        if jacobian is None:
            jacobian = gradient.new_zeros((n_tasks, *tensor.shape))
            tensor.__setattr__("jac", jacobian)
        elif jacobian.shape != (n_tasks, *tensor.shape):
            raise ValueError(
                f"The .jac field of a tensor has shape {tuple(jacobian.shape)}, which does not "
                f"have {n_tasks} rows of shape {tuple(tensor.shape)}."
            )
        jacobian[task].add_(gradient, alpha=scale)


def _leaf_tensors(loss: Tensor) -> list[Tensor]:
    """The leaf tensors requiring grad that ``loss`` depends on, in order of discovery."""

    leaves: dict[int, Tensor] = {}
    seen: set[object] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    if not leaves:
        raise ValueError("Parameter `loss` does not depend on any tensor that requires grad.")
    return list(leaves.values())
