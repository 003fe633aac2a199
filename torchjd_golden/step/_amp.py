r"""
Aggregating correctly under a ``torch.amp.GradScaler``.

The scaler multiplies the losses by a scale :math:`s`, so the Jacobian that reaches the
aggregator is :math:`sJ`; ``scaler.step`` later divides the update by :math:`s`. That is right
only for an aggregator with :math:`A(sJ) = s A(J)`. Golden Pendulum is scale-free
(:math:`A(sJ) = A(J)`: the update comes out :math:`s` times too small), and ExcessMTL and GCond
keep statistics with absolute magnitudes that a changing :math:`s` corrupts. Aggregating
:math:`J = sJ / s` and handing back :math:`s A(J)` is right for every aggregator.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.amp import GradScaler
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting

from ..aggregation._aggregator_bases import GramianAggregator, MatrixAggregator


def with_grad_scaler(aggregator: Aggregator, scaler: GradScaler) -> Aggregator:
    r"""
    Returns an aggregator that, given the Jacobian :math:`sJ` of losses scaled by ``scaler``,
    returns :math:`s A(J)`, so that the update ``scaler.step`` applies is :math:`A(J)`, as
    without loss scaling. It shares ``aggregator``'s weighting and state (keep ``aggregator`` for
    its settings, monitoring and ``reset``).

    .. code-block:: python

        scaler = torch.amp.GradScaler("cuda")
        aggregator = with_grad_scaler(GoldenPendulum(), scaler)
        ...
        mtl_backward(scaler.scale(losses), features=features)
        jac_to_grad(shared_parameters, aggregator)
        scaler.step(optimizer)
        scaler.update()

    For a Gramian weighting, its input is divided by :math:`s^2` (an :math:`m \times m`
    operation, and the result still works with ``optimize_gramian_computation=True``); for a
    weighting of the Jacobian, by :math:`s`; an aggregator with its own ``forward`` (such as
    :class:`~torchjd_golden.GCond`, which adds momentum) is called on :math:`sJ / s` and its
    output multiplied by :math:`s`. The scale is read as a tensor at each call, without a host
    synchronisation.

    On an overflow step the Jacobian holds inf or NaN: this package's stateful aggregators then
    leave their state untouched and return NaN, which the scaler detects before skipping the
    step, so the skip is clean.
    """

    forward = type(aggregator).forward
    if isinstance(aggregator, GramianWeightedAggregator) and forward is WeightedAggregator.forward:
        weighting = UnscaledWeighting(aggregator.gramian_weighting, scaler, power=2)
        return _ScaledGramianAggregator(weighting, aggregator)
    if isinstance(aggregator, WeightedAggregator) and forward is WeightedAggregator.forward:
        weighting = UnscaledWeighting(aggregator.weighting, scaler, power=1)
        return _ScaledMatrixAggregator(weighting, aggregator)
    return UnscaledAggregator(aggregator, scaler)


class _NamedAfterTheWrapped:
    """``repr``: the ``with_grad_scaler`` call that made the aggregator; ``str``: the wrapped's."""

    _wrapped_repr: str
    _wrapped_str: str

    def _name_after(self, aggregator: Aggregator) -> None:
        self._wrapped_repr, self._wrapped_str = repr(aggregator), str(aggregator)

    def __repr__(self) -> str:
        return f"with_grad_scaler({self._wrapped_repr})"

    def __str__(self) -> str:
        return self._wrapped_str


class _ScaledGramianAggregator(_NamedAfterTheWrapped, GramianAggregator):
    def __init__(self, weighting: UnscaledWeighting, aggregator: Aggregator) -> None:
        super().__init__(weighting)
        self._name_after(aggregator)


class _ScaledMatrixAggregator(_NamedAfterTheWrapped, MatrixAggregator):
    def __init__(self, weighting: UnscaledWeighting, aggregator: Aggregator) -> None:
        super().__init__(weighting)
        self._name_after(aggregator)


def _current_scale(scaler: GradScaler, like: Tensor) -> Tensor | None:
    scale = scaler._get_scale_async() if scaler.is_enabled() else None
    return None if scale is None else scale.to(dtype=like.dtype, device=like.device)


class UnscaledWeighting(Weighting[Any]):
    r"""
    The weighting of a scaled input: ``weighting`` applied to the input divided by
    :math:`s^{power}` (``power=2`` for a Gramian, 1 for a Jacobian).
    """

    def __init__(self, weighting: Weighting[Any], scaler: GradScaler, power: int) -> None:
        super().__init__()
        self.weighting, self.scaler, self.power = weighting, scaler, power

    @property
    def splits_over_columns(self) -> bool:
        """Whether the wrapped weighting runs on blocks of columns (see the step engine)."""
        return bool(getattr(self.weighting, "splits_over_columns", False))

    def forward(self, stat: Tensor, /) -> Tensor:
        scale = _current_scale(self.scaler, stat)
        return self.weighting(stat if scale is None else stat / scale**self.power)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weighting!r})"


class UnscaledAggregator(_NamedAfterTheWrapped, Aggregator):
    """An aggregator of a scaled Jacobian :math:`sJ` that returns :math:`s A(sJ / s)`."""

    def __init__(self, aggregator: Aggregator, scaler: GradScaler) -> None:
        super().__init__()
        self.aggregator, self.scaler = aggregator, scaler
        self._name_after(aggregator)

    @property
    def splits_over_columns(self) -> bool:
        """Whether the wrapped aggregator runs on blocks of columns (see the step engine)."""
        return bool(getattr(self.aggregator, "splits_over_columns", False))

    def forward(self, matrix: Tensor, /) -> Tensor:
        scale = _current_scale(self.scaler, matrix)
        if scale is None:
            return self.aggregator(matrix)
        return scale * self.aggregator(matrix / scale)
