"""
What :class:`~torchjd_golden.ConflictMonitor` reports, read on the host: the report of a step, the
alerts and the summary, with the reference's wording and rounding.

Reference: ``golden_pendulum.pro.DiagnosticsEngine`` and ``ConflictReport``
(``golden-pendulum-mtl`` 0.2.0).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The order of the statistics kept per step, and the decimals the reference rounds them to.
STATISTICS = ("conflict_ratio", "norm_ratio", "weight_deviation", "balance_ratio", "resonance")
_DECIMALS = {
    "conflict_ratio": 4,
    "norm_ratio": 2,
    "weight_deviation": 6,
    "balance_ratio": 4,
    "resonance": 4,
}
_PAIR_DECIMALS = 4
_RESONANCE_ALERT = 0.7


@dataclass
class ConflictReport:
    """
    The diagnostics of one step, with the fields of ``golden_pendulum.pro.ConflictReport``.

    :ivar step: The index of the step among the recorded ones.
    :ivar conflict_ratio: The fraction of the task pairs whose gradients have a negative cosine.
    :ivar conflict_pairs: ``(task_i, task_j, cosine)`` for each conflicting pair, ``i < j``.
    :ivar gradient_norms: The gradient norm of each task, by name.
    :ivar norm_ratio: The largest over the smallest gradient norm.
    :ivar weight_deviation: The Euclidean distance of the last recorded weights from the golden
        targets (:func:`~torchjd_golden.golden_ratio_weights`); 0 before any.
    :ivar balance_ratio: :math:`w_{\\min} / w_{\\max}` of the last recorded weights; 0 before any.
    :ivar resonance_score: How periodic the weights are, from 0 to 1 (see
        :class:`ConflictMonitor`).
    """

    step: int
    conflict_ratio: float
    conflict_pairs: list[tuple[Any, Any, float]]
    gradient_norms: dict[Any, float]
    norm_ratio: float
    weight_deviation: float
    balance_ratio: float
    resonance_score: float = 0.0


def statistics_of(row: Sequence[float], rounded: bool) -> dict[str, float]:
    """A step's statistics by name, rounded as the reference rounds them if ``rounded``."""

    statistics = dict(zip(STATISTICS, row, strict=True))
    if not rounded:
        return statistics
    return {name: round(value, _DECIMALS[name]) for name, value in statistics.items()}


def conflicting_pairs(
    names: Sequence[Hashable], cosines: Sequence[Sequence[float]], rounded: bool
) -> list[tuple[Any, Any, float]]:
    """``(task_i, task_j, cosine)`` for each pair ``i < j`` with a negative cosine."""

    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if cosines[i][j] < 0.0:
                value = round(cosines[i][j], _PAIR_DECIMALS) if rounded else cosines[i][j]
                pairs.append((names[i], names[j], value))
    return pairs


def alert_messages(
    statistics: Mapping[str, float],
    *,
    conflict_ratio: float,
    norm_ratio: float,
    balance_floor: float,
) -> list[str]:
    """The alerts of a step's statistics against the thresholds, in the reference's words."""

    conflict, ratio = statistics["conflict_ratio"], statistics["norm_ratio"]
    balance, resonance = statistics["balance_ratio"], statistics["resonance"]
    alerts = []
    if conflict > conflict_ratio:
        alerts.append(
            f"HIGH CONFLICT: {conflict:.2%} of task pairs conflicting "
            f"(threshold: {conflict_ratio:.2%})"
        )
    if ratio > norm_ratio:
        alerts.append(
            f"GRADIENT IMBALANCE: norm ratio {ratio:.1f}x "
            f"(threshold: {norm_ratio:.1f}x). Gradient normalization is critical."
        )
    if 0.0 < balance < balance_floor:
        alerts.append(
            f"LOW BALANCE: w_min/w_max = {balance:.3f} "
            f"(threshold: {balance_floor:.3f}). Consider increasing lambda."
        )
    if resonance > _RESONANCE_ALERT:
        alerts.append(
            f"RESONANCE DETECTED: score {resonance:.3f}. "
            "Weights are oscillating periodically. Increase lambda."
        )
    return alerts


def summary_text(recent: Sequence[Mapping[str, float]], alerts: Sequence[str]) -> str:
    """The reference's summary: the averages of the ``recent`` steps' statistics, the alerts."""

    if not recent:
        return "No diagnostics recorded yet."

    def average(name: str) -> float:
        return sum(statistics[name] for statistics in recent) / len(recent)

    lines = [
        f"=== Golden Pendulum Diagnostics (last {len(recent)} steps) ===",
        f"  Avg conflict ratio:   {average('conflict_ratio'):.3f}",
        f"  Avg norm ratio:       {average('norm_ratio'):.1f}x",
        f"  Avg balance:          {average('balance_ratio'):.3f}",
        f"  Avg resonance score:  {average('resonance'):.3f}",
    ]
    if alerts:
        lines.append("  ALERTS:")
        lines.extend(f"    ! {alert}" for alert in alerts)
    return "\n".join(lines)
