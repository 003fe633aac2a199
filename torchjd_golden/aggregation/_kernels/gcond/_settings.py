"""The settings and the outcome of GCond's resolution, which both paths share."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

HALF_PI = math.pi / 2.0


@dataclass(frozen=True)
class ResolveSettings:
    """The hyper-parameters of the resolution, as the reference names them."""

    conflict_thresholds: tuple[float, float, float]
    use_smooth_logic: bool
    remap_power: float
    dominance_window: int
    tie_breaking_weights: tuple[float, float]
    norm_cap: float | None
    max_iters: int
    eps: float


@dataclass
class Resolution:
    """The outcome of one resolution: the resolved rows are ``coefficients @ J``."""

    coefficients: Tensor
    history: Tensor
    history_count: Tensor
    proj_iters: Tensor
    min_cosine_sim: Tensor
    last_zone: Tensor  # of the last resolved pair: 0 none, 1 weak, 2 main, 3 critical
    last_winner: Tensor  # the task id the arbitrator last named, -1 if none


ZONES = ("none", "weak", "main", "critical")
"""The names of the zones, by the numbers of :attr:`Resolution.last_zone`."""
