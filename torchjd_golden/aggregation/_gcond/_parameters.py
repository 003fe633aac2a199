"""
The hyper-parameters of GCond, shared by :class:`~torchjd_golden.GCondWeighting` and
:class:`~torchjd_golden.GCond`: validated as the official implementation's constructor validates
them (a little stricter, see each setter), and turned into the kernel's settings.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._kernels.gcond import ResolveSettings
from .._parameters import HyperParameters
from .._validation import check_bool, check_int, check_real


class GCondParameters(HyperParameters):
    """The hyper-parameters of the resolution, validated as the reference validates them."""

    @property
    def conflict_thresholds(self) -> tuple[float, float, float]:
        """Cosine thresholds (critical, main, weak) of the conflict zones."""
        return self._conflict_thresholds

    @conflict_thresholds.setter
    def conflict_thresholds(self, value: Sequence[float]) -> None:
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
            raise ValueError(
                "Attribute `conflict_thresholds` must be 3 floats (critical, main, weak). "
                f"Found conflict_thresholds={value!r}."
            )
        thresholds = tuple(check_real("conflict_thresholds", v, low=-1.0, high=1.0) for v in value)
        if not thresholds[0] <= thresholds[1] <= thresholds[2]:
            raise ValueError(
                "Attribute `conflict_thresholds` must be in non-decreasing order "
                f"(critical <= main <= weak). Found conflict_thresholds={value!r}."
            )
        self._conflict_thresholds = (thresholds[0], thresholds[1], thresholds[2])

    @property
    def use_smooth_logic(self) -> bool:
        """Smooth angle-based projection (``True``) or the legacy four-zone logic."""
        return self._use_smooth_logic

    @use_smooth_logic.setter
    def use_smooth_logic(self, value: bool) -> None:
        self._use_smooth_logic = check_bool("use_smooth_logic", value)

    @property
    def remap_power(self) -> float:
        """Exponent of the main-zone angle remapping (smooth logic)."""
        return self._remap_power

    @remap_power.setter
    def remap_power(self, value: float) -> None:
        self._remap_power = check_real("remap_power", value, low=0.0, low_open=True)

    @property
    def dominance_window(self) -> int:
        """Length of the winner history; 0 turns the dominance rule off."""
        return self._dominance_window

    @dominance_window.setter
    def dominance_window(self, value: int) -> None:
        self._dominance_window = check_int("dominance_window", value, low=0)

    @property
    def tie_breaking_weights(self) -> tuple[float, float]:
        """Weights (stability, strength) of the arbitration score."""
        return self._tie_breaking_weights

    @tie_breaking_weights.setter
    def tie_breaking_weights(self, value: Sequence[float]) -> None:
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(
                "Attribute `tie_breaking_weights` must be 2 non-negative numbers with a positive "
                f"sum. Found tie_breaking_weights={value!r}."
            )
        stability, strength = (check_real("tie_breaking_weights", v, low=0.0) for v in value)
        if stability + strength <= 0.0:
            raise ValueError(
                "Attribute `tie_breaking_weights` must have a positive sum. "
                f"Found tie_breaking_weights={value!r}."
            )
        self._tie_breaking_weights = (stability, strength)

    @property
    def norm_ema_beta(self) -> float:
        """Decay of the per-task gradient-norm averages."""
        return self._norm_ema_beta

    @norm_ema_beta.setter
    def norm_ema_beta(self, value: float) -> None:
        self._norm_ema_beta = check_real("norm_ema_beta", value, low=0.0, high=1.0, high_open=True)

    @property
    def norm_cap(self) -> float | None:
        """Cap on each task's gradient norm before resolution (``None``: no cap)."""
        return self._norm_cap

    @norm_cap.setter
    def norm_cap(self, value: float | None) -> None:
        self._norm_cap = (
            None if value is None else check_real("norm_cap", value, low=0.0, low_open=True)
        )

    @property
    def projection_max_iters(self) -> int | None:
        """Most resolution iterations per step (``None``: twice the number of tasks)."""
        return self._projection_max_iters

    @projection_max_iters.setter
    def projection_max_iters(self, value: int | None) -> None:
        self._projection_max_iters = (
            None if value is None else check_int("projection_max_iters", value, low=1)
        )

    @property
    def eps(self) -> float:
        """Small constant of the denominators and of the zero-norm test."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = check_real("eps", value, low=0.0, low_open=True)

    def _settings(self, n_tasks: int) -> ResolveSettings:
        return ResolveSettings(
            conflict_thresholds=self.conflict_thresholds,
            use_smooth_logic=self.use_smooth_logic,
            remap_power=self.remap_power,
            dominance_window=self.dominance_window,
            tie_breaking_weights=self.tie_breaking_weights,
            norm_cap=self.norm_cap,
            max_iters=self.projection_max_iters or 2 * n_tasks,
            eps=self.eps,
        )
