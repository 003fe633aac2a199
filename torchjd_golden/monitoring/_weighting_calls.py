"""
What a forward hook on a weighting reads of a call (its Gramian, Golden Pendulum's ``alpha``),
and the weights as scalars by task name, which the logger, the recorders and the trainers log.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from torch import Tensor, nn
from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator

from ..aggregation._gramian import compute_gramian, over_all_columns
from ..aggregation._tasks import default_task_names


def hook_gramian(inputs: tuple[Tensor, ...], gramian_input: bool) -> Tensor:
    """
    The Gramian of a weighting's call, from the input its forward hook sees: that input when the
    weighting takes the Gramian, computed from the Jacobian (an :math:`O(m^2 n)` product)
    otherwise (from all its columns, in a step that splits them over the ranks).
    """

    stat = inputs[0].detach()
    return stat if gramian_input else over_all_columns(compute_gramian(stat))


def hook_alpha(module: nn.Module, weights: Tensor) -> Tensor | None:
    """
    The ``alpha`` a weighting kept for the call that gave ``weights`` (Golden Pendulum's QP
    solution, what its references report as the weights), or ``None``.
    """

    alpha = getattr(module, "alpha", None)
    return alpha if isinstance(alpha, Tensor) and alpha.shape == weights.shape else None


def task_names(tasks: Sequence[Hashable] | None, m: int) -> list[Any]:
    """``tasks`` (checked to have ``m`` entries), or ``task_0`` ... ``task_{m-1}``."""

    if tasks is None:
        return list(default_task_names(m))
    names = list(tasks)
    if len(names) != m:
        raise ValueError(f"Parameter `tasks` names {len(names)} tasks, but there are {m} weights.")
    return names


def text_task_names(tasks: Sequence[Hashable] | None, m: int) -> list[str]:
    """
    The task names as text, the keys of a log (``tasks``, checked to have ``m`` entries, or
    ``task_0`` ... ``task_{m-1}``).

    :raises ValueError: If two names read the same as text (``1`` and ``"1"``): their logged
        values would overwrite each other.
    """

    texts: dict[str, Hashable] = {}
    for name in task_names(tasks, m):
        text = str(name)
        if text in texts:
            raise ValueError(
                f"The task names {texts[text]!r} and {name!r} both read {text!r} as text, so "
                "their logged weights would overwrite each other: give names that differ as text."
            )
        texts[text] = name
    return list(texts)


def weight_scalars(
    weights: Tensor, tasks: Sequence[Hashable], alpha: Tensor | None = None
) -> dict[str, Tensor]:
    r"""
    The scalars to log for one call of a weighting, as 0-dimensional tensors (nothing is read on
    the host): ``weight/{task}`` and ``balance_ratio`` (:math:`\min_k w_k / \max_k w_k`), and,
    given Golden Pendulum's QP solution :math:`\alpha` (the numbers golden-pendulum-mtl reports
    as its weights), ``alpha/{task}`` and ``alpha_balance_ratio``.
    """

    values = weights.detach().float()
    names = text_task_names(tasks, values.shape[0])
    scalars = {f"weight/{name}": value for name, value in zip(names, values.unbind(), strict=True)}
    scalars["balance_ratio"] = values.min() / values.max()
    if alpha is not None:
        alphas = alpha.detach().float()
        scalars |= {f"alpha/{name}": a for name, a in zip(names, alphas.unbind(), strict=True)}
        scalars["alpha_balance_ratio"] = alphas.min() / alphas.max()
    return scalars


def weighting_of(aggregator: nn.Module) -> nn.Module:
    """
    The weighting to hook for ``aggregator``'s weights: its Gramian weighting if it has one
    (that is where Golden Pendulum keeps ``alpha``), else its weighting.
    """

    if isinstance(aggregator, GramianWeightedAggregator):
        return aggregator.gramian_weighting
    if isinstance(aggregator, WeightedAggregator):
        return aggregator.weighting
    raise TypeError(
        f"`{aggregator.__class__.__name__}` does not combine the rows with a weighting, so it has "
        "no weights to log or record."
    )
