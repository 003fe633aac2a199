r"""
Consistent aggregation across the ranks of ``torch.distributed``.

torchjd differentiates with ``torch.autograd.grad`` and ``jac_to_grad`` writes ``.grad``
itself, so DDP's gradient all-reduce never runs: every rank would aggregate its own Jacobian,
and weights, state and parameters would drift apart. The helpers here make all ranks aggregate
the Jacobian of the whole batch (the mean of the ranks' Jacobians), so every rank computes the
same update and keeps the same aggregator state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torchjd.aggregation import GramianWeightedAggregator

from ..aggregation._gramian import combine_rows, compute_gramian


def sync_jacobians(tensors: Iterable[Tensor], *, group: dist.ProcessGroup | None = None) -> None:
    r"""
    Averages the ``.jac`` and ``.grad`` fields of ``tensors`` across the ranks of ``group``, in
    place: call it after ``backward``/``mtl_backward`` and before ``jac_to_grad``. Then every
    rank holds the Jacobian of the whole batch, and any aggregator, stateful or not, computes the
    same update and state on every rank.

    Cost: an all-reduce of the :math:`m \times n` Jacobian, :math:`m` times the :math:`n` values
    that DDP all-reduces for a gradient (a rank sends :math:`2\frac{R-1}{R} mn` values with a
    ring all-reduce), plus the task heads' gradients. The fields of all
    tensors are flattened into one buffer per dtype, so there are only a few collective calls.
    For a Gramian-weighted aggregator, :func:`sharded_jac_to_grad` is exact and moves about half
    as much.

    :param tensors: The tensors whose ``.jac`` (and ``.grad``, where set) fields to average, e.g.
        ``model.parameters()``. Every rank must pass the same tensors in the same order.
    :param group: The process group (the default group when ``None``).
    """

    fields = []
    for tensor in tensors:
        for name in ("jac", "grad"):
            value = getattr(tensor, name, None)
            if isinstance(value, Tensor):
                fields.append(value)
    _all_reduce_mean(fields, group)


def _all_reduce_mean(fields: list[Tensor], group: dist.ProcessGroup | None) -> None:
    world_size = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for field in fields:
        by_dtype.setdefault(field.dtype, []).append(field)
    for same_dtype in by_dtype.values():
        flat = torch.cat([field.reshape(-1) for field in same_dtype])
        dist.all_reduce(flat, group=group)
        flat /= world_size
        for field, chunk in zip(
            same_dtype, torch.split(flat, [f.numel() for f in same_dtype]), strict=True
        ):
            field.copy_(chunk.view_as(field))


def sharded_jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: GramianWeightedAggregator,
    *,
    retain_jac: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    r"""
    ``jac_to_grad`` for a Gramian-weighted aggregator under ``torch.distributed``, exact and
    cheaper than :func:`sync_jacobians`: the update is that of the mean Jacobian
    :math:`\bar J = \frac1R \sum_r J_r` of the :math:`R` ranks.

    1. a reduce-scatter gives each rank a block of columns of :math:`\bar J`;
    2. each rank computes the Gramian of its block; an all-reduce of these :math:`m \times m`
       matrices gives :math:`\bar G = \bar J \bar J^\top`, the same on every rank;
    3. every rank applies the weighting to :math:`\bar G` (same input, same state: same
       weights), multiplies its block, and an all-gather assembles :math:`w^\top \bar J`.

    With ring collectives, a rank sends :math:`\frac{R-1}{R}(mn + n)` values (a reduce-scatter
    of the Jacobian, an all-gather of the update) instead of the :math:`2\frac{R-1}{R} mn` of
    the all-reduce in :func:`sync_jacobians`: about half, or :math:`m/2` times what DDP sends
    for one gradient. Each rank also computes only :math:`1/R` of the Gramian. As with
    ``jac_to_grad``, the ``.jac`` fields are freed (unless ``retain_jac``) and ``.grad``
    receives the update; the task heads' ``.grad`` still need :func:`sync_jacobians` to be
    averaged. Hooks registered on ``aggregator.gramian_weighting`` run; hooks on the aggregator
    itself do not, since it never sees the whole Jacobian. Returns the weights.

    :param tensors: The tensors whose ``.jac`` to aggregate, the same on every rank.
    :param aggregator: A :class:`~torchjd.aggregation.GramianWeightedAggregator`.
    :param retain_jac: Whether to keep the ``.jac`` fields.
    :param group: The process group (the default group when ``None``).
    """

    if not isinstance(aggregator, GramianWeightedAggregator):
        raise ValueError(
            "`sharded_jac_to_grad` needs a GramianWeightedAggregator (its weights depend on the "
            f"Gramian only). Found {aggregator!r}; use `sync_jacobians` then `jac_to_grad`."
        )
    targets = list(tensors)
    if not targets or any(getattr(t, "jac", None) is None for t in targets):
        raise ValueError(
            "Every tensor needs a populated `.jac` field: call `backward` or `mtl_backward` first."
        )
    jacobians = [t.jac.reshape(t.jac.shape[0], -1) for t in targets]  # type: ignore[attr-defined]
    if not retain_jac:
        for t in targets:
            del t.jac  # type: ignore[attr-defined]
    matrix = torch.cat(jacobians, dim=1)
    del jacobians
    world_size = dist.get_world_size(group)
    m, n = matrix.shape
    width = -(-n // world_size)  # ceil: the last block is padded with zeros
    blocks = matrix.new_zeros(world_size, m, width)
    for rank, start in enumerate(range(0, n, width)):
        columns = matrix[:, start : start + width]
        blocks[rank, :, : columns.shape[1]] = columns
    del matrix
    block = blocks.new_empty(m, width)
    dist.reduce_scatter(block, list(blocks.unbind(0)), group=group)
    del blocks
    block /= world_size

    gramian = compute_gramian(block)
    dist.all_reduce(gramian, group=group)
    weights = aggregator.gramian_weighting(gramian)

    update_block = combine_rows(weights, block).contiguous()
    gathered = [torch.empty_like(update_block) for _ in range(world_size)]
    dist.all_gather(gathered, update_block, group=group)
    update = torch.cat(gathered)[:n]

    for tensor, chunk in zip(
        targets, torch.split(update, [t.numel() for t in targets]), strict=True
    ):
        gradient = chunk.view_as(tensor).to(tensor.dtype)
        tensor.grad = gradient if tensor.grad is None else tensor.grad + gradient
    return weights
