r"""
The aggregation of a Jacobian spread over the ranks by columns: every rank computes the same
weights from the same :math:`m \times m` statistics, and combines its own columns.

An aggregator is run in one of three ways, chosen by :func:`column_split`:

- ``"gramian"`` (a Gramian weighting: ours, torchjd's): the Gramian is a sum over columns, so the
  blocks' Gramians are summed by one all-reduce of :math:`m^2` numbers (with the losses riding
  along); every rank applies the weighting to the same Gramian and combines its block;
- ``"blocks"`` (a method whose row statistics are sums or maxima over columns, ExcessMTL and
  GCond here): the method runs on the block inside
  :func:`~torchjd_golden.aggregation._gramian.column_blocks`, which all-reduces each such
  statistic; its per-column state (ExcessMTL's squares, GCond's previous rows and momentum) is
  this rank's block only;
- ``"whole"`` (any other aggregator): the blocks are gathered, every rank aggregates the whole
  Jacobian (the same state on every rank) and keeps its columns.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import torch
from torch import Tensor, nn
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting
from torchjd.linalg import PSDMatrix

from ..aggregation._gramian import column_blocks, combine_rows, compute_gramian
from ..aggregation._tasks import set_step_inputs
from ._collectives import RankGroup
from ._jacobian import is_compiled

ColumnSplit = Literal["gramian", "blocks", "whole"]
GramianSource = Literal["parameters", "features"]
_SOURCES = ("parameters", "features")


def column_split(aggregator: Aggregator) -> ColumnSplit:
    """How ``aggregator`` runs on a Jacobian whose columns are spread over the ranks."""

    if isinstance(aggregator, GramianWeightedAggregator) and not _overrides_forward(aggregator):
        return "gramian"
    if isinstance(aggregator, WeightedAggregator) and not _overrides_forward(aggregator):
        splits = getattr(aggregator.weighting, "splits_over_columns", False)
    else:
        splits = getattr(aggregator, "splits_over_columns", False)
    # A compiled method cannot read which block it runs on: it gets the whole Jacobian.
    return "blocks" if splits and not is_compiled(aggregator) else "whole"


def gramian_weighting_of(aggregator: Aggregator) -> Weighting[PSDMatrix] | None:
    """The Gramian weighting an aggregator applies to the Gramian, if that is all it does."""

    if column_split(aggregator) != "gramian":
        return None
    assert isinstance(aggregator, GramianWeightedAggregator)
    return aggregator.gramian_weighting


def check_gramian_source(aggregator: Aggregator, gramian_from: object) -> None:
    """Refuses a ``gramian_from`` that is not a source, or ``"features"`` for ``aggregator``."""

    if gramian_from not in _SOURCES:
        raise ValueError(
            f"Parameter `gramian_from` must be one of {_SOURCES}. Found {gramian_from!r}."
        )
    if gramian_from == "features" and gramian_weighting_of(aggregator) is None:
        raise ValueError(
            f"`gramian_from='features'` needs an aggregator that weights the Gramian only (a "
            f"Gramian weighting). {aggregator!r} weights the Jacobian itself: use "
            "`gramian_from='parameters'`."
        )


def _overrides_forward(aggregator: Aggregator) -> bool:
    return type(aggregator).forward is not WeightedAggregator.forward


def aggregate_block(
    aggregator: Aggregator,
    block: Tensor,
    ranks: RankGroup,
    *,
    inputs_of: Aggregator | None,
    tasks: tuple[Hashable, ...] | None = None,
    losses: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""
    This rank's columns of the aggregation of the whole Jacobian, and the weights (``None`` for an
    aggregator without), from this rank's ``block`` of columns of it.

    ``losses`` (this rank's, one per task) are averaged over the ranks and given, with ``tasks``,
    to ``inputs_of`` (the user's aggregator, which ``aggregator`` may wrap) for the methods that
    read them; with ``inputs_of=None`` the caller has given the aggregator its inputs itself.
    """

    split = column_split(aggregator)
    reads_losses = losses is not None and hasattr(type(inputs_of), "losses")
    if split == "gramian":
        with column_blocks(ranks.all_reduce_rows):  # (no rank upcasts an overflow on its own)
            gramian = compute_gramian(block)
        m = gramian.shape[0]
        statistics = gramian.reshape(-1)
        if reads_losses:
            assert losses is not None
            statistics = torch.cat([statistics, losses.to(statistics)])
        ranks.all_reduce(statistics)
        gramian = statistics[: m * m].view(m, m)
        mean_losses = statistics[m * m :] / ranks.size if reads_losses else None
        _give_step_inputs(inputs_of, tasks, mean_losses)
        weighting = gramian_weighting_of(aggregator)
        assert weighting is not None
        gramian_weights = weighting(gramian)
        return combine_rows(gramian_weights, block), gramian_weights

    give_mean_step_inputs(ranks, inputs_of, tasks, losses)
    if split == "blocks":
        with column_blocks(ranks.all_reduce_rows):
            return call_capturing_weights(aggregator, block)
    whole, offset = ranks.all_gather_columns(block)
    update, weights = call_capturing_weights(aggregator, whole)
    return update[offset : offset + block.shape[1]], weights


def give_mean_step_inputs(
    ranks: RankGroup,
    inputs_of: Aggregator | None,
    tasks: tuple[Hashable, ...] | None,
    losses: Tensor | None,
) -> None:
    """
    Gives ``inputs_of`` the step's task names and, if it reads them, ``losses`` (this rank's)
    averaged over the ranks: one all-reduce of :math:`m` numbers, only for such an aggregator.
    """

    if losses is not None and hasattr(type(inputs_of), "losses"):
        losses = ranks.all_reduce(losses.clone()) / ranks.size
    _give_step_inputs(inputs_of, tasks, losses)


def _give_step_inputs(
    inputs_of: Aggregator | None, tasks: tuple[Hashable, ...] | None, losses: Tensor | None
) -> None:
    if inputs_of is not None:
        set_step_inputs(inputs_of, tasks, losses)


def call_capturing_weights(aggregator: Aggregator, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """
    ``aggregator(matrix)`` and the weights its weighting returned, captured as
    ``torchjd.autojac.jac_to_grad`` captures them (after every other hook of the weighting).
    """

    weights: Tensor | None = None
    if not isinstance(aggregator, WeightedAggregator):
        return aggregator(matrix), None

    def capture(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal weights
        weights = output

    handle = aggregator.weighting.register_forward_hook(capture)
    try:
        update = aggregator(matrix)
    finally:
        handle.remove()
    return update, weights
