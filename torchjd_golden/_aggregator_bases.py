"""The torchjd aggregator bases, with the Gramian and the combination computed by the Gram core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from torch import Tensor
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting
from torchjd.linalg import Matrix, PSDMatrix

from ._gramian import combine_rows, compute_gramian
from ._torchjd_compat import weighting_of_matrix
from ._validation import check_input


class GramianAggregator(GramianWeightedAggregator):
    """
    :class:`~torchjd.aggregation.GramianWeightedAggregator` whose Gramian is accumulated in at
    least float32 and whose output has the dtype of the Jacobian, even for half-precision input.
    """

    def __init__(self, gramian_weighting: Weighting[PSDMatrix]) -> None:
        super().__init__(gramian_weighting)
        gramian_of = cast(Callable[[Matrix], PSDMatrix], compute_gramian)
        self.weighting = weighting_of_matrix(gramian_weighting, gramian_of)

    def __call__(self, matrix: Tensor, /) -> Tensor:
        return _checked_call(self, matrix)

    @staticmethod
    def _combine(matrix: Matrix, weights: Tensor) -> Tensor:
        return combine_rows(weights, matrix)

    def __str__(self) -> str:
        return self.__class__.__name__


class MatrixAggregator(WeightedAggregator):
    """:class:`~torchjd.aggregation.WeightedAggregator` giving an output in the Jacobian's dtype."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        return _checked_call(self, matrix)

    @staticmethod
    def _combine(matrix: Matrix, weights: Tensor) -> Tensor:
        return combine_rows(weights, matrix)


def _checked_call(aggregator: Aggregator, matrix: Tensor) -> Tensor:
    # Before torchjd's own check, which assumes a tensor; the Gramian would hide an empty Jacobian.
    check_input(matrix, aggregator, gramian=False)
    return Aggregator.__call__(aggregator, matrix)


def forwarded(name: str, doc: str | None = None) -> Any:
    """A property of an aggregator that reads and writes the same property of its weighting."""

    def getter(self: WeightedAggregator) -> Any:
        return getattr(_inner_weighting(self), name)

    def setter(self: WeightedAggregator, value: Any) -> None:
        setattr(_inner_weighting(self), name, value)

    return property(getter, setter, doc=doc or f"See the weighting's ``{name}``.")


def _inner_weighting(aggregator: WeightedAggregator) -> Any:
    if isinstance(aggregator, GramianWeightedAggregator):
        return aggregator.gramian_weighting
    return aggregator.weighting
