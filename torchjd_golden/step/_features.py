r"""
The fast step: weights from the Gramian of the tasks' gradients with respect to the shared
features, then one ordinary backward pass.

With :math:`F_k = \partial L_k / \partial z` the gradient of task :math:`k` with respect to the
features :math:`z` (the trunk's output, every sample's), the feature Gramian is
:math:`G^z_{ij} = \langle F_i, F_j \rangle`: :math:`m` backward passes through the heads only.
The weights :math:`w` come from it (as MGDA-UB and LibMTL's ``rep_grad`` do); then one backward
pass of the losses sends :math:`\sum_k w_k F_k` into the trunk, whose parameters receive
exactly :math:`w^\top J` for those :math:`w`, through the model's own machinery (DDP's
all-reduce, FSDP2's reduce-scatter, a compiled backward). Only the weights are approximate: they
come from the inner products of the :math:`F_k` themselves, where the parameters' Gramian
:math:`J J^\top` takes them through the trunk, :math:`J_k = F_k \, \partial z / \partial \theta`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..aggregation._gramian import combine_rows
from ._collectives import RankGroup


def feature_gradients(losses: Sequence[Tensor], features: Sequence[Tensor]) -> Tensor:
    """
    The ``[m, N]`` matrix whose row :math:`k` is the gradient of ``losses[k]`` with respect to
    ``features`` (flattened and joined), by one backward pass per loss through the heads.
    """

    rows = []
    reached = False
    for loss in losses:
        gradients = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
        reached = reached or any(g is not None for g in gradients)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(f) if g is None else g).reshape(-1)
                    for f, g in zip(features, gradients, strict=True)
                ]
            )
        )
    if not reached:
        raise ValueError(
            "No loss depends on the given `features`: they must be the shared representation "
            "between the trunk and the heads. (A module compiled as a whole computes its losses "
            "inside one graph, where its returned features are not on their path: compile the "
            "trunk and the heads separately.)"
        )
    return torch.stack(rows)


def weighted_backward(
    losses: Sequence[Tensor],
    weights: Tensor,
    features: Sequence[Tensor] | None,
    rows: Tensor | None,
) -> None:
    r"""
    One backward pass that gives the trunk (every parameter before ``features``) the gradient of
    :math:`\sum_k w_k L_k` and every other parameter its own task's gradient (the gradient of
    :math:`\sum_k L_k`), as ``mtl_backward`` does. Without ``features`` every parameter receives
    the gradient of :math:`\sum_k w_k L_k`.
    """

    if features is None or rows is None:
        torch.autograd.backward(
            list(losses),
            grad_tensors=[w.to(loss.dtype) for w, loss in zip(weights, losses, strict=True)],
        )
        return
    combined = combine_rows(weights, rows)
    pieces = torch.split(combined, [f.numel() for f in features])
    handles = [
        feature.register_hook(_replacement(piece.view_as(feature)))  # type: ignore[no-untyped-call]
        for feature, piece in zip(features, pieces, strict=True)
    ]
    try:
        torch.autograd.backward(list(losses))
    finally:
        for handle in handles:
            handle.remove()


def all_reduced_feature_gramian(
    ranks: RankGroup, gramian: Tensor, losses: Tensor
) -> tuple[Tensor, Tensor]:
    r"""
    The feature Gramian of the global-mean losses, from this rank's ``gramian`` and ``losses``:
    the gradient of :math:`\frac1R \sum_r L_r` with respect to rank :math:`r`'s features is
    :math:`\frac1R` of its own, so the Gramian is :math:`\frac{1}{R^2} \sum_r G_r`; and the mean
    losses. One all-reduce of :math:`m^2 + m` numbers.
    """

    m, size = gramian.shape[0], ranks.size
    statistics = torch.cat([gramian.reshape(-1), losses.to(gramian.dtype)])
    ranks.all_reduce(statistics)
    return statistics[: m * m].view(m, m) / size**2, statistics[m * m :] / size


def _replacement(gradient: Tensor) -> Callable[[Tensor], Tensor]:
    """A tensor hook that replaces the gradient flowing into a tensor by ``gradient``."""

    def hook(_incoming: Tensor) -> Tensor:
        return gradient

    return hook
