"""
How the reference's ``backward(losses, model, shared_params)`` calls fill the ``.grad`` fields,
done with torchjd: one ``backward`` for the Jacobian instead of one backward pass per task.

The reference computes each task's gradient with ``loss.backward()`` after clearing the ``.grad``
fields of the shared parameters, then writes the balanced gradient into them. So the shared
parameters' ``.grad`` is replaced, and every other tensor that requires gradients and that the
losses reach gets the sum of the tasks' gradients added to its ``.grad``: the model's other
parameters, and tensors outside the model too (an uncertainty weighting's log-variances).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torchjd.aggregation import Aggregator
from torchjd.autojac import backward, jac_to_grad

from ..aggregation._gramian import compute_gramian
from ..aggregation._torchjd_compat import leaf_tensors


def shared_parameters(model: nn.Module, shared_params: Iterable[Tensor] | None) -> list[Tensor]:
    """``shared_params``, or the model's parameters that require gradients (as the reference)."""

    if shared_params is not None:
        return list(shared_params)
    parameters: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("No parameters with requires_grad=True found in model")
    return parameters


def single_task_backward(losses: Mapping[str, Tensor]) -> dict[str, float]:
    """The reference's path for at most one task: the plain gradient, added to ``.grad``."""

    if losses:
        torch.autograd.backward(torch.stack(list(losses.values())).sum())
    return dict.fromkeys(losses, 1.0)


def _jacobian_rows(
    losses: Mapping[str, Tensor], shared: list[Tensor], *, retain_graph: bool
) -> None:
    """
    Fills ``.jac`` of ``shared`` and adds the summed gradients to every other leaf the losses
    reach that requires gradients, in the model or not.
    """

    stacked = torch.stack(list(losses.values()))
    shared_ids = {id(p) for p in shared}
    others = [leaf for leaf in leaf_tensors(stacked) if id(leaf) not in shared_ids]
    backward(stacked, inputs=shared, retain_graph=retain_graph or bool(others))
    if others:
        torch.autograd.backward(stacked.sum(), inputs=others, retain_graph=retain_graph)


def balanced_backward(
    losses: Mapping[str, Tensor],
    model: nn.Module,
    shared_params: Iterable[Tensor] | None,
    aggregator: Aggregator,
) -> None:
    """Writes ``aggregator``'s combination of the tasks' gradients into the shared parameters."""

    shared = shared_parameters(model, shared_params)
    _jacobian_rows(losses, shared, retain_graph=False)
    for parameter in shared:
        parameter.grad = None
    jac_to_grad(shared, aggregator)


def task_gramian(
    losses: Mapping[str, Tensor], model: nn.Module, shared_params: Iterable[Tensor] | None
) -> Tensor:
    """
    The Gramian of the tasks' gradients over the shared parameters, keeping the graph and leaving
    the shared parameters' ``.grad`` as it was (as the reference's ``analyze``).
    """

    shared = shared_parameters(model, shared_params)
    _jacobian_rows(losses, shared, retain_graph=True)
    jacobians = []
    for parameter in shared:
        jacobians.append(parameter.jac.flatten(1))  # type: ignore[attr-defined]
        del parameter.jac  # type: ignore[attr-defined]
    return compute_gramian(torch.cat(jacobians, dim=1))


def weights_by_name(names: Iterable[str], weights: Tensor) -> dict[str, float]:
    """The weights as Python floats, by task name (the reference's return value)."""

    return dict(zip(names, weights.tolist(), strict=True))
