"""``golden_pendulum.core``: the functional backward and ``GoldenPendulumMTL``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..aggregation._golden_pendulum import PHI, GoldenPendulum
from ..aggregation._golden_pendulum import golden_ratio_weights as _golden_ratio_weights
from ._backward import balanced_backward, single_task_backward, weights_by_name
from ._settings import aggregator_setting

__all__ = ["PHI", "GoldenPendulumMTL", "golden_nash_backward", "golden_ratio_weights"]


def golden_ratio_weights(
    n_tasks: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """
    The golden-ratio targets :math:`\\varphi^k / \\sum_j \\varphi^j`, in float32 on the CPU by
    default (as the reference; :func:`torchjd_golden.golden_ratio_weights` takes the default
    dtype).
    """

    return _golden_ratio_weights(n_tasks, device=device, dtype=dtype)


def golden_backward(
    aggregator: GoldenPendulum,
    losses: Mapping[str, Tensor],
    model: nn.Module,
    shared_params: Iterable[Tensor] | None,
) -> dict[str, float]:
    """``aggregator``'s gradient in ``.grad`` the reference's way; its QP solution by task name."""

    if len(losses) <= 1:
        return single_task_backward(losses)
    balanced_backward(losses, model, shared_params, aggregator)
    assert aggregator.alpha is not None
    return weights_by_name(losses, aggregator.alpha)


def golden_nash_backward(
    losses: Mapping[str, Tensor],
    model: nn.Module,
    lam: float = 0.5,
    n_iter: int = 25,
    min_weight_fraction: float = 0.02,
    pcgrad: bool = True,
    shared_params: Iterable[Tensor] | None = None,
) -> dict[str, float]:
    """
    Computes the tasks' gradients, balances them with Golden Pendulum (golden-ratio QP, then
    PCGrad on the normalised gradients) and writes the result into the ``.grad`` fields of the
    shared parameters (by default every parameter that requires gradients), replacing them.

    With torchjd this is ``backward(losses)`` then ``jac_to_grad(params, GoldenPendulum(...))``;
    this function does that in one backward pass (the reference takes one per task).

    :returns: The QP weight of each task, by name (1.0 for a single task, whose plain gradient
        is added to ``.grad``).
    """

    aggregator = GoldenPendulum(
        lam=lam, n_iter=n_iter, min_weight_fraction=min_weight_fraction, pcgrad=pcgrad
    )
    return golden_backward(aggregator, losses, model, shared_params)


class GoldenPendulumMTL:
    """
    Golden Pendulum with a history of the weights, as ``golden_pendulum.GoldenPendulumMTL``.

    :param n_tasks: The number of tasks each call must have (0: any).
    :param lam: Strength of the pull towards the golden-ratio targets.
    :param n_iter: Number of QP steps.
    :param min_weight_fraction: Floor of each weight, as a fraction of one over the task count.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    """

    def __init__(
        self,
        n_tasks: int = 0,
        lam: float = 0.5,
        n_iter: int = 25,
        min_weight_fraction: float = 0.02,
        pcgrad: bool = True,
    ) -> None:
        self.n_tasks = n_tasks
        self.aggregator = GoldenPendulum.from_arguments(locals())
        self.weight_history: list[dict[str, float]] = []

    lam = aggregator_setting(GoldenPendulum, "lam")
    n_iter = aggregator_setting(GoldenPendulum, "n_iter")
    min_weight_fraction = aggregator_setting(GoldenPendulum, "min_weight_fraction")
    pcgrad = aggregator_setting(GoldenPendulum, "pcgrad")

    def backward(
        self,
        losses: Mapping[str, Tensor],
        model: nn.Module,
        shared_params: Iterable[Tensor] | None = None,
    ) -> dict[str, float]:
        """:func:`golden_nash_backward` with this object's settings; records the weights."""

        if self.n_tasks > 0 and len(losses) != self.n_tasks:
            raise ValueError(f"Expected {self.n_tasks} tasks, got {len(losses)}: {list(losses)}")
        weights = golden_backward(self.aggregator, losses, model, shared_params)
        self.weight_history.append(weights)
        return weights

    @property
    def golden_targets(self) -> dict[str, float] | None:
        """The float32 golden-ratio targets of the last call's tasks (``None`` before any)."""

        if not self.weight_history:
            return None
        names = list(self.weight_history[-1])
        return weights_by_name(names, golden_ratio_weights(len(names)))

    @property
    def weight_balance_ratio(self) -> float:
        """:math:`w_{\\min} / w_{\\max}` of the last call (0.0 before any)."""

        if not self.weight_history:
            return 0.0
        values = list(self.weight_history[-1].values())
        return min(values) / max(values) if max(values) > 0 else 0.0

    def mean_weights(self, last_n: int = 100) -> dict[str, float]:
        """The mean weight of each task of the first of the last ``last_n`` calls over them."""

        if not self.weight_history:
            return {}
        history = self.weight_history[-last_n:]
        return {name: sum(h[name] for h in history) / len(history) for name in history[0]}

    def reset(self) -> None:
        """Clears the history."""

        self.weight_history.clear()
