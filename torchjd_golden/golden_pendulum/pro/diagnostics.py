"""``golden_pendulum.pro.DiagnosticsEngine`` on :class:`torchjd_golden.ConflictMonitor`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ...monitoring import ConflictMonitor, ConflictReport
from .._backward import task_gramian


class DiagnosticsEngine:
    """
    Gradient-conflict diagnostics over a rolling window, as
    ``golden_pendulum.pro.DiagnosticsEngine``, with its numbers (rounded as it rounds them, and
    float32 golden targets). :meth:`analyze` takes one torchjd backward pass for all tasks (the
    reference takes one per task); :class:`torchjd_golden.ConflictMonitor` takes none, reading
    the Gramian the aggregator computes.

    :param window_size: Number of steps kept.
    :param alert_conflict_ratio: Alert above this conflict ratio.
    :param alert_norm_ratio: Alert above this gradient norm ratio.
    :param alert_balance_floor: Alert below this (positive) balance.
    """

    def __init__(
        self,
        window_size: int = 500,
        alert_conflict_ratio: float = 0.6,
        alert_norm_ratio: float = 100.0,
        alert_balance_floor: float = 0.10,
    ) -> None:
        self.monitor = ConflictMonitor(
            window_size=window_size,
            alert_conflict_ratio=alert_conflict_ratio,
            alert_norm_ratio=alert_norm_ratio,
            alert_balance_floor=alert_balance_floor,
            rounded=True,
            target_dtype=torch.float32,
        )

    @property
    def window_size(self) -> int:
        """Number of steps kept."""
        return self.monitor.window_size

    @property
    def alert_conflict_ratio(self) -> float:
        """Alert above this conflict ratio."""
        return self.monitor.alert_conflict_ratio

    @property
    def alert_norm_ratio(self) -> float:
        """Alert above this gradient norm ratio."""
        return self.monitor.alert_norm_ratio

    @property
    def alert_balance_floor(self) -> float:
        """Alert below this balance."""
        return self.monitor.alert_balance_floor

    def analyze(
        self,
        losses: Mapping[str, Tensor],
        model: nn.Module,
        shared_params: Iterable[Tensor] | None = None,
    ) -> ConflictReport:
        """
        The report of this step's gradients (the shared parameters' ``.grad`` is left as it was,
        and the graph is kept for the backward that follows).
        """

        gramian = task_gramian(losses, model, shared_params)
        self.monitor.record(gramian, tasks=list(losses))
        return self.monitor.report()

    def record_weights(self, step: int, weights: Mapping[str, float]) -> None:
        """Appends the step's weights (by task name) to the window."""

        del step  # as in the reference, the window's order is the order of the calls
        self.monitor.record_weights(weights)

    @property
    def alerts(self) -> list[str]:
        """The alerts of the last :meth:`analyze`."""
        return self.monitor.alerts

    def summary(self) -> str:
        """Averages over the last 10 reports, and the current alerts."""
        return self.monitor.summary()
