"""
Every use of a private name of torchjd, in one place: a torchjd minor release that moves one
breaks this module only.

torchjd 0.18 exports the abstract :class:`~torchjd.aggregation.Weighting` but keeps the bases
that say which input a weighting takes (``Weighting[Matrix]`` or ``Weighting[PSDMatrix]``) and
the mixin that switches autograd off private. Our weightings subclass them so that they behave
exactly like torchjd's own (same ``__call__`` signature and hooks, no graph).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torchjd._linalg import compute_gramian as torchjd_compute_gramian
from torchjd.aggregation import Weighting
from torchjd.aggregation._mixins import _NonDifferentiable
from torchjd.aggregation._weighting_bases import _GramianWeighting, _MatrixWeighting
from torchjd.autojac._utils import get_leaf_tensors
from torchjd.linalg import Matrix, PSDMatrix

from ._gramian import compute_gramian

NonDifferentiable = _NonDifferentiable
"""Mixin running a module's call under :func:`torch.no_grad`, as torchjd's weightings do."""

GramianWeightingBase = _GramianWeighting
"""Base of the weightings of the Gramian (``Weighting[PSDMatrix]``): they work with autogram."""

# The functions that turn a Jacobian into its Gramian: torchjd's GramianWeightedAggregator
# composes its weighting with the first, this package's Gramian aggregators with the second.
_GRAMIAN_FUNCTIONS: tuple[Callable[..., Any], ...] = (torchjd_compute_gramian, compute_gramian)


class MatrixWeightingBase(_MatrixWeighting):
    """
    Base of the weightings of the Jacobian itself (``Weighting[Matrix]``), which refuse to be
    applied to the Gramian.

    torchjd types a Gramian as ``PSDMatrix`` for the type checker only: at run time it is a
    plain tensor, and a square Jacobian looks the same. What can be told is the path that makes
    the Gramian: a ``GramianWeightedAggregator`` (torchjd's or this package's, and with it
    ``jac_to_grad(..., optimize_gramian_computation=True)``) composes its weighting with a
    Gramian function (``weighting << compute_gramian``), and that composition raises a
    ``TypeError`` here. A direct call on a square matrix, such as the autogram ``Engine``'s
    Gramian, takes it as a Jacobian with as many parameters as tasks.
    """

    def _compose(self, fn: Callable[[Any], Matrix]) -> Weighting[Any]:
        if any(fn is gramian_function for gramian_function in _GRAMIAN_FUNCTIONS):
            name = type(self).__name__
            aggregator = name.removesuffix("Weighting")
            raise TypeError(
                f"`{name}` weights the Jacobian itself (a Weighting[Matrix]), so it cannot be "
                "applied to the Gramian that a GramianWeightedAggregator gives it. Use "
                f"`{aggregator}()` or `WeightedAggregator({name}())` with `jac_to_grad`."
            )
        return super()._compose(fn)

    __lshift__ = _compose


def weighting_of_matrix(
    gramian_weighting: Weighting[PSDMatrix], gramian_of: Callable[[Matrix], PSDMatrix]
) -> Weighting[Matrix]:
    """
    The weighting of the Jacobian that applies ``gramian_weighting`` to ``gramian_of(J)``: what a
    ``GramianWeightedAggregator`` stores as its ``weighting`` (torchjd composes it with its own
    Gramian function; ours accumulates half-precision input in float32).

    The Gramian weighting is not registered as a submodule of the composition: the aggregator
    registers it already (as ``gramian_weighting``), and its state would otherwise be listed twice
    in the aggregator's ``state_dict``.
    """

    composition = gramian_weighting << gramian_of
    del composition._modules["weighting"]
    object.__setattr__(composition, "weighting", gramian_weighting)
    return composition


def leaf_tensors(tensor: Tensor) -> list[Tensor]:
    """
    The leaves of ``tensor``'s autograd graph that require gradients, in torchjd's order: what
    ``tensor.backward()`` would write ``.grad`` to (torchjd's ``backward`` finds its default
    ``inputs`` so).
    """

    return list(get_leaf_tensors(tensors=[tensor], excluded=[]))
