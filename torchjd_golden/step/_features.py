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
from ._jacobian import share_graph_above


def feature_gradients(
    losses: Sequence[Tensor], features: Sequence[Tensor], *, batched: bool = True
) -> Tensor:
    """
    The ``[m, N]`` matrix whose row :math:`k` is the gradient of ``losses[k]`` with respect to
    ``features`` (flattened and joined), through the heads only.

    Where the losses share a part of the graph above the features (the entries of one stacked
    vector of losses, the heads' outputs concatenated), a pass per loss would go through all the
    heads each time (:math:`m^2` head passes): with ``batched`` the :math:`m` gradients are one
    vectorised pass (``is_grads_batched``, ``torch.vmap``). Where each loss has its own head, one
    pass per loss goes through its head only, which is what a vectorised pass would cost for every
    head: the passes stay one per loss.
    """

    if batched and share_graph_above(losses, features):
        gradients = _batched_gradients(losses, features)
    else:
        gradients = _gradients_one_by_one(losses, features)
    if all(g is None for g in gradients):
        raise ValueError(
            "No loss depends on the given `features`: they must be the shared representation "
            "between the trunk and the heads. (A module compiled as a whole computes its losses "
            "inside one graph, where its returned features are not on their path: compile the "
            "trunk and the heads separately.)"
        )
    m = len(losses)
    return torch.cat(
        [
            (f.new_zeros(m, f.numel()) if g is None else g.reshape(m, -1))
            for f, g in zip(features, gradients, strict=True)
        ],
        dim=1,
    )


def _batched_gradients(
    losses: Sequence[Tensor], features: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """Per feature tensor, the ``[m, *shape]`` gradients of the losses: one vectorised pass."""

    identity = torch.eye(len(losses), dtype=losses[0].dtype, device=losses[0].device)
    basis = [identity[k].to(loss.dtype) for k, loss in enumerate(losses)]
    return torch.autograd.grad(
        list(losses),
        list(features),
        grad_outputs=basis,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )


def _gradients_one_by_one(
    losses: Sequence[Tensor], features: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """Per feature tensor, the ``[m, *shape]`` gradients of the losses: one pass per loss."""

    per_loss = [
        torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True) for loss in losses
    ]
    if all(g is None for gradients in per_loss for g in gradients):
        return tuple(None for _ in features)
    zeros = [torch.zeros_like(f) for f in features]
    return tuple(
        torch.stack([zero if g[i] is None else g[i] for g in per_loss])
        for i, zero in enumerate(zeros)
    )


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
