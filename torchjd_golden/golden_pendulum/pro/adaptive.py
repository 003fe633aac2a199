"""``golden_pendulum.pro.AdaptiveLambda`` on :class:`torchjd_golden.AdaptiveGoldenPendulum`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...aggregation._adaptive_golden_pendulum import (
    AdaptiveGoldenPendulum,
    AdaptiveGoldenPendulumWeighting,
)
from ...aggregation._adaptive_lambda import _MIN_LOSS, conflicting_fraction
from ...aggregation._gramian import normalize_gramian
from .._backward import balanced_backward, single_task_backward, weights_by_name
from .._settings import aggregator_setting


class _ReferenceLossRatioWeighting(AdaptiveGoldenPendulumWeighting):
    """
    The reference's loss ratio: the smallest loss floored at 1e-10, even when it is zero or
    negative (the native class leaves the average alone at such a step).
    """

    @staticmethod
    def _step_loss_ratio(losses: Tensor) -> Tensor:
        return losses.max() / losses.min().clamp(min=_MIN_LOSS)


class _ReferenceAdaptiveGoldenPendulum(AdaptiveGoldenPendulum):
    _weighting_class = _ReferenceLossRatioWeighting


class AdaptiveLambda:
    """
    Golden Pendulum whose :math:`\\lambda` adapts to the conflicts between tasks and to the
    spread of their losses, as ``golden_pendulum.pro.AdaptiveLambda``. See
    :class:`torchjd_golden.AdaptiveGoldenPendulumWeighting` for the update.

    As the reference, :meth:`reset` keeps the current :math:`\\lambda` (the native class's
    ``reset`` restores ``lam_init``), and the history records each call's own conflict and loss
    ratios.
    """

    def __init__(
        self,
        lam_init: float = 0.5,
        lam_min: float = 0.05,
        lam_max: float = 2.0,
        ema_decay: float = 0.95,
        conflict_target: float = 0.3,
        sensitivity: float = 1.0,
        loss_ratio_aware: bool = True,
        n_iter: int = 25,
        min_weight_fraction: float = 0.02,
        pcgrad: bool = True,
    ) -> None:
        aggregator = _ReferenceAdaptiveGoldenPendulum.from_arguments(locals())
        self.aggregator: AdaptiveGoldenPendulum = aggregator
        self._step = 0
        self._history: list[dict[str, Any]] = []
        self._conflict_ratio = 0.0
        self.aggregator.gramian_weighting.register_forward_pre_hook(self._measure_conflicts)

    lam_min = aggregator_setting(AdaptiveGoldenPendulum, "lam_min")
    lam_max = aggregator_setting(AdaptiveGoldenPendulum, "lam_max")
    ema_decay = aggregator_setting(AdaptiveGoldenPendulum, "ema_decay")
    conflict_target = aggregator_setting(AdaptiveGoldenPendulum, "conflict_target")
    sensitivity = aggregator_setting(AdaptiveGoldenPendulum, "sensitivity")
    loss_ratio_aware = aggregator_setting(AdaptiveGoldenPendulum, "loss_ratio_aware")
    n_iter = aggregator_setting(AdaptiveGoldenPendulum, "n_iter")
    min_weight_fraction = aggregator_setting(AdaptiveGoldenPendulum, "min_weight_fraction")
    pcgrad = aggregator_setting(AdaptiveGoldenPendulum, "pcgrad")

    def _measure_conflicts(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        # The history's conflict ratio is the call's own, which the weighting only averages.
        normalized, _ = normalize_gramian(inputs[0])
        self._conflict_ratio = float(conflicting_fraction(normalized))

    @property
    def current_lam(self) -> float:
        """The current :math:`\\lambda`."""
        return float(self.aggregator.current_lam)

    @property
    def conflict_ratio(self) -> float:
        """The moving average of the fraction of conflicting task pairs."""
        return float(self.aggregator.conflict_ratio)

    @property
    def loss_ratio(self) -> float:
        """The moving average of the largest over the smallest loss."""
        return float(self.aggregator.loss_ratio)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        model: nn.Module,
        shared_params: Iterable[Tensor] | None = None,
    ) -> dict[str, float]:
        """Golden Pendulum with the adapted :math:`\\lambda`; returns the weights by name."""

        if len(losses) <= 1:
            return single_task_backward(losses)
        values = torch.stack([loss.detach() for loss in losses.values()]).tolist()  # one read
        loss_ratio = max(values) / max(min(values), _MIN_LOSS)
        self.aggregator.tasks = list(losses)  # per-task state follows the names
        self.aggregator.losses = torch.tensor(values, dtype=torch.float64)
        balanced_backward(losses, model, shared_params, self.aggregator)
        weights = weights_by_name(losses, self.aggregator.alpha)
        self._history.append(
            {
                "step": self._step,
                "lam": round(self.current_lam, 6),
                "conflict_ratio": round(self._conflict_ratio, 4),
                "loss_ratio": round(loss_ratio, 2),
                "weights": weights,
            }
        )
        self._step += 1
        return weights

    def get_history(self, last_n: int = 0) -> list[dict[str, Any]]:
        """The history of the calls (the last ``last_n`` when positive)."""

        return self._history[-last_n:] if last_n > 0 else list(self._history)

    def reset(self) -> None:
        """Restarts the averages, the step count and the history, keeping :math:`\\lambda`."""

        self.aggregator.lam_init = self.current_lam
        self.aggregator.reset()
        self._step = 0
        self._history.clear()
