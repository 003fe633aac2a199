r"""
The exact step's Jacobian on one process's batch, in torchjd's ``.jac`` fields.

Batched, it is torchjd's own ``backward`` (or ``mtl_backward`` given the features), which
differentiates the :math:`m` losses at once with ``torch.vmap``. Per task, it is :math:`m`
ordinary backward passes, one per loss, for the graphs vmap cannot go through: the backward of a
compiled module, and random operations replayed by activation checkpointing. Both give the shared
parameters the rows of the Jacobian (``.jac``) and the other trainable parameters the sum of
their rows, i.e. each its own task's gradient (``.grad``), as ``mtl_backward`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchjd.autojac import backward, mtl_backward

from ._parameters import graph_leaves


def accumulate_jacobians(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    *,
    features: Sequence[Tensor] | None,
    per_task: bool,
    retain_graph: bool = False,
) -> None:
    """
    Adds the Jacobian of ``losses`` with respect to ``shared`` to their ``.jac`` fields and the sum
    of its rows with respect to ``others`` to their ``.grad`` fields.
    """

    if per_task:
        _per_task(losses, shared, others, retain_graph)
    elif features is not None and shared:
        mtl_backward(
            list(losses),
            features=list(features),
            shared_params=list(shared),
            tasks_params=_heads(losses, features, others),
            retain_graph=retain_graph or share_graph_above(losses, features),
        )
    else:
        backward(list(losses), inputs=[*shared, *others], retain_graph=retain_graph)
        for tensor in others:
            add_gradient(tensor, tensor.jac.sum(dim=0))  # type: ignore[attr-defined]
            del tensor.jac  # type: ignore[attr-defined]


def _per_task(
    losses: Sequence[Tensor], shared: Sequence[Tensor], others: Sequence[Tensor], retain: bool
) -> None:
    m = len(losses)
    inputs = [*shared, *others]
    for task, loss in enumerate(losses):
        gradients = torch.autograd.grad(
            loss, inputs, retain_graph=retain or task < m - 1, allow_unused=True
        )
        for tensor, gradient in zip(shared, gradients[: len(shared)], strict=True):
            add_to_row(tensor, task, m, gradient)
        for tensor, gradient in zip(others, gradients[len(shared) :], strict=True):
            # Zeros where a loss does not reach the parameter, as mtl_backward gives.
            add_gradient(tensor, torch.zeros_like(tensor) if gradient is None else gradient)


def _heads(
    losses: Sequence[Tensor], features: Sequence[Tensor], others: Sequence[Tensor]
) -> list[list[Tensor]]:
    """
    Per loss, the parameters of ``others`` its graph reaches above ``features`` (its head), the
    ones no loss reaches given to the first (zeros, as every loss gives them elsewhere). Each
    loss differentiated with respect to every head would cost m^2 head gradients, most of them
    zeros: 2.5x the step at 40 tasks.
    """

    wanted = {id(p) for p in others}
    heads = [
        [p for key, p in graph_leaves([loss], stops=features).items() if key in wanted]
        for loss in losses
    ]
    reached = {id(p) for head in heads for p in head}
    heads[0] += [p for p in others if id(p) not in reached]
    return heads


def share_graph_above(losses: Sequence[Tensor], features: Sequence[Tensor]) -> bool:
    """
    Whether two of ``losses`` share a node of the graph between them and ``features`` (as the
    entries of one stacked vector do): ``mtl_backward`` differentiates that part once per task,
    so it must keep the graph for the later tasks. A walk of the heads' graphs only.
    """

    stops = {f.grad_fn for f in features}
    seen: set[object] = set()
    for loss in losses:
        mine: set[object] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in stops or node in mine:
                continue
            if node in seen:
                return True
            mine.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
        seen |= mine
    return False


def add_to_row(
    tensor: Tensor, task: int, m: int, gradient: Tensor | None, *, alpha: float = 1.0
) -> None:
    """
    Adds ``alpha`` times ``gradient`` (``None``: zeros) to row ``task`` of the :math:`m`-row
    ``.jac`` field of ``tensor``, made of zeros where there is none.
    """

    jacobian = getattr(tensor, "jac", None)
    if jacobian is None:
        jacobian = tensor.new_zeros((m, *tensor.shape))
        tensor.__setattr__("jac", jacobian)
    elif jacobian.shape != (m, *tensor.shape):
        raise ValueError(
            f"The .jac field of a tensor has shape {tuple(jacobian.shape)}, which does not "
            f"have {m} rows of shape {tuple(tensor.shape)}."
        )
    if gradient is not None:
        jacobian[task].add_(gradient, alpha=alpha)


def add_gradient(tensor: Tensor, gradient: Tensor) -> None:
    """Adds ``gradient`` to ``tensor.grad`` (sets it when there is none)."""

    tensor.grad = gradient if tensor.grad is None else tensor.grad + gradient


def discard_jacobians(tensors: Sequence[Tensor]) -> None:
    """Deletes the ``.jac`` fields of ``tensors`` (those that have one)."""

    for tensor in tensors:
        if hasattr(tensor, "jac"):
            del tensor.jac


def flat_jacobian(tensors: Sequence[Tensor], *, discard: bool = True) -> Tensor:
    """The ``.jac`` fields of ``tensors`` as one ``[m, n]`` matrix (the fields deleted unless not
    ``discard``)."""

    matrices = [tensor.jac.reshape(tensor.jac.shape[0], -1) for tensor in tensors]  # type: ignore[attr-defined]
    if discard:
        discard_jacobians(tensors)
    return torch.cat(matrices, dim=1)


def write_gradients(tensors: Sequence[Tensor], vector: Tensor) -> None:
    """Adds the pieces of ``vector``, in order, to the ``.grad`` fields of ``tensors``."""

    pieces = torch.split(vector, [t.numel() for t in tensors])
    for tensor, piece in zip(tensors, pieces, strict=True):
        add_gradient(tensor, piece.view_as(tensor).to(tensor.dtype))


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules runs compiled (``torch.compile``)."""

    compiled = torch._dynamo.eval_frame.OptimizedModule
    return any(
        isinstance(sub, compiled) or getattr(sub, "_compiled_call_impl", None) is not None
        for sub in module.modules()
    )
