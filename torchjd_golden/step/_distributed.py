r"""
Consistent aggregation across the ranks of ``torch.distributed``, for a loop of torchjd's own
functions (``backward``/``mtl_backward``, then ``jac_to_grad``): the step engine's collectives
(:mod:`._collectives`) and its aggregation of a Jacobian spread over the ranks by columns
(:mod:`._sharded`), as two functions.

torchjd differentiates with ``torch.autograd.grad`` and ``jac_to_grad`` writes ``.grad``
itself, so DDP's gradient all-reduce never runs: every rank would aggregate its own Jacobian,
and weights, state and parameters would drift apart. The helpers here make all ranks aggregate
the Jacobian of the whole batch (the mean of the ranks' Jacobians), so every rank computes the
same update.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import Tensor
from torchjd.aggregation import Aggregator

from ._collectives import ColumnBlocks, RankGroup
from ._jacobian import flat_jacobian, write_gradients
from ._sharded import aggregate_block, column_split


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
    For an aggregator that splits over columns, :func:`sharded_jac_to_grad` is exact and moves
    about half as much.

    :param tensors: The tensors whose ``.jac`` (and ``.grad``, where set) fields to average, e.g.
        ``model.parameters()``. Every rank must pass the same tensors in the same order.
    :param group: The process group (the default group when ``None``).
    """

    fields = [
        value
        for tensor in tensors
        for value in (getattr(tensor, "jac", None), tensor.grad)
        if isinstance(value, Tensor)
    ]
    for field, mean in zip(fields, RankGroup(group).average(fields), strict=True):
        field.copy_(mean)


def sharded_jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Tensor | None:
    r"""
    ``jac_to_grad`` under ``torch.distributed``, exact and cheaper than :func:`sync_jacobians`,
    for an aggregator that splits over the columns of the Jacobian: the update is that of the
    mean Jacobian :math:`\bar J = \frac1R \sum_r J_r` of the :math:`R` ranks.

    1. a reduce-scatter gives each rank a block of columns of :math:`\bar J`;
    2. a Gramian-weighted aggregator: each rank computes the Gramian of its block; an all-reduce
       of these :math:`m \times m` matrices gives :math:`\bar G = \bar J \bar J^\top`, the same
       on every rank, and every rank applies the weighting to it (same input, same state: same
       weights) and multiplies its block. ExcessMTL and GCond run on the block, each statistic
       of the rows they need all-reduced over the blocks; their per-column state (ExcessMTL's
       squared-gradient sums, GCond's previous rows and momentum) is then this rank's block only,
       and a checkpoint of it is per rank;
    3. an all-gather assembles the update.

    With ring collectives, a rank sends :math:`\frac{R-1}{R}(mn + n)` values (a reduce-scatter
    of the Jacobian, an all-gather of the update) instead of the :math:`2\frac{R-1}{R} mn` of
    the all-reduce in :func:`sync_jacobians`: about half, or :math:`m/2` times what DDP sends
    for one gradient. Each rank also computes only :math:`1/R` of the Gramian. As with
    ``jac_to_grad``, the ``.jac`` fields are freed (unless ``retain_jac``) and ``.grad``
    receives the update; the task heads' ``.grad`` still need :func:`sync_jacobians` to be
    averaged. The aggregator's extra inputs (``tasks``, ``losses``) are those the caller gave it.
    Hooks registered on ``aggregator.gramian_weighting`` run (on the whole :math:`\bar G`); hooks
    on a Gramian-weighted aggregator itself do not, since it never sees the whole Jacobian.
    Returns the weights (``None`` for an aggregator without, such as GCond).

    :param tensors: The tensors whose ``.jac`` to aggregate, the same on every rank.
    :param aggregator: A :class:`~torchjd.aggregation.GramianWeightedAggregator` (ours, torchjd's),
        or this package's :class:`~torchjd_golden.ExcessMTL` or :class:`~torchjd_golden.GCond`.
    :param retain_jac: Whether to keep the ``.jac`` fields.
    :param group: The process group (the default group when ``None``).
    """

    if column_split(aggregator) == "whole":
        raise ValueError(
            "`sharded_jac_to_grad` needs an aggregator that splits over the Jacobian's columns: a "
            "GramianWeightedAggregator (its weights depend on the Gramian only), or this "
            f"package's ExcessMTL or GCond. Found {aggregator!r}; use `sync_jacobians` then "
            "`jac_to_grad`."
        )
    targets = list(tensors)
    if not targets or any(getattr(t, "jac", None) is None for t in targets):
        raise ValueError(
            "Every tensor needs a populated `.jac` field: call `backward` or `mtl_backward` first."
        )
    jacobian = flat_jacobian(targets, discard=not retain_jac)
    ranks = RankGroup(group)
    blocks = ColumnBlocks(ranks, jacobian.shape[1])
    block = blocks.reduce_scatter_mean(jacobian)
    del jacobian
    update_block, weights = aggregate_block(aggregator, block, ranks, inputs_of=None)
    write_gradients(targets, blocks.all_gather(update_block))
    return weights
