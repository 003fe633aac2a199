r"""
The adaptive :math:`\lambda` of ``golden_pendulum.pro.AdaptiveLambda``: its update, a pure
function of the state and of a step's conflict and loss ratios, and its hyper-parameters (see
:class:`~torchjd_golden.AdaptiveGoldenPendulumWeighting` for the formulas).

Reference: the package ``golden-pendulum-mtl`` 0.2.0 (``golden_pendulum.pro.adaptive``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._golden_pendulum import GoldenQPParameters
from ._validation import check_bool, check_real

# The reference clamps the smallest loss here before dividing by it.
_MIN_LOSS = 1e-10


@dataclass(frozen=True)
class AdaptiveLambdaSettings:
    """The hyper-parameters of the :math:`\\lambda` update (see :func:`adaptive_lambda_step`)."""

    ema_decay: float
    conflict_target: float
    sensitivity: float
    loss_ratio_aware: bool
    lam_min: float
    lam_max: float


def conflicting_fraction(normalized_gramian: Tensor) -> Tensor:
    """The fraction of the pairs :math:`i < j` with a negative inner product, in float64."""

    m = normalized_gramian.shape[0]
    rows, columns = torch.triu_indices(m, m, offset=1, device=normalized_gramian.device)
    conflicts = (normalized_gramian[rows, columns] < 0.0).sum().to(torch.float64)
    fraction: Tensor = conflicts / rows.numel()
    return fraction


def step_loss_ratio(losses: Tensor) -> Tensor:
    r"""
    The spread :math:`\max_k L_k / \max(\min_k L_k, 10^{-10})` of positive losses, or NaN when
    the smallest loss is zero or negative: the ratio then measures nothing (a log-likelihood
    loss is negative, a loss can reach zero), and dividing by the floor would give about
    :math:`10^{10}`, as golden-pendulum-mtl does.
    """

    smallest = losses.min()
    ratio = losses.max() / smallest.clamp(min=_MIN_LOSS)
    return torch.where(smallest > 0.0, ratio, torch.nan)


def adaptive_lambda_step(
    lam: Tensor,
    conflict_ema: Tensor,
    loss_ratio_ema: Tensor,
    conflict_ratio: Tensor,
    loss_ratio: Tensor | None,
    settings: AdaptiveLambdaSettings,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""
    One update of ``AdaptiveLambda``'s state: returns the new :math:`(\lambda, c, r)` from the
    old ones and this step's conflict ratio and largest-over-smallest loss ratio (``None``, or
    NaN where :func:`step_loss_ratio` is undefined, keeps :math:`r`). See
    :class:`AdaptiveGoldenPendulumWeighting` for the formulas.
    """

    decay = settings.ema_decay
    conflict_ema = decay * conflict_ema + (1.0 - decay) * conflict_ratio
    if loss_ratio is not None:
        averaged = decay * loss_ratio_ema + (1.0 - decay) * loss_ratio
        loss_ratio_ema = torch.where(loss_ratio.isnan(), loss_ratio_ema, averaged)
    drift = settings.sensitivity * (conflict_ema - settings.conflict_target) * 0.1
    lam = lam * torch.exp(drift)
    if settings.loss_ratio_aware:
        boost = 1.0 + 0.1 * torch.log(loss_ratio_ema.clamp(min=1.0))
        lam = torch.where(loss_ratio_ema > 1.0, lam * boost, lam)
    return lam.clamp(min=settings.lam_min, max=settings.lam_max), conflict_ema, loss_ratio_ema


def _check_bounds(lam_min: float, lam_max: float) -> None:
    if lam_min > lam_max:
        raise ValueError(
            f"Attributes `lam_min` and `lam_max` must satisfy lam_min <= lam_max. Found "
            f"lam_min={lam_min!r} and lam_max={lam_max!r}."
        )


class AdaptiveLambdaParameters(GoldenQPParameters):
    r"""
    The hyper-parameters of :class:`~torchjd_golden.AdaptiveGoldenPendulumWeighting` and
    :class:`~torchjd_golden.AdaptiveGoldenPendulum`: those of the :math:`\lambda` update, and
    the QP's.
    """

    @property
    def lam_init(self) -> float:
        """Initial :math:`\\lambda`."""
        return self._lam_init

    @lam_init.setter
    def lam_init(self, value: float) -> None:
        self._lam_init = check_real("lam_init", value, low=0.0)

    @property
    def lam_min(self) -> float:
        """Lower bound of :math:`\\lambda`."""
        return self._lam_min

    @lam_min.setter
    def lam_min(self, value: float) -> None:
        value = check_real("lam_min", value, low=0.0)
        _check_bounds(value, getattr(self, "_lam_max", value))
        self._lam_min = value

    @property
    def lam_max(self) -> float:
        """Upper bound of :math:`\\lambda`."""
        return self._lam_max

    @lam_max.setter
    def lam_max(self, value: float) -> None:
        value = check_real("lam_max", value, low=0.0)
        _check_bounds(getattr(self, "_lam_min", value), value)
        self._lam_max = value

    @property
    def ema_decay(self) -> float:
        """Decay of the conflict and loss-ratio averages."""
        return self._ema_decay

    @ema_decay.setter
    def ema_decay(self, value: float) -> None:
        self._ema_decay = check_real("ema_decay", value, low=0.0, high=1.0, high_open=True)

    @property
    def conflict_target(self) -> float:
        """Conflict ratio at which :math:`\\lambda` stays put."""
        return self._conflict_target

    @conflict_target.setter
    def conflict_target(self, value: float) -> None:
        self._conflict_target = check_real("conflict_target", value, low=0.0, high=1.0)

    @property
    def sensitivity(self) -> float:
        """How fast :math:`\\lambda` follows the conflict ratio."""
        return self._sensitivity

    @sensitivity.setter
    def sensitivity(self, value: float) -> None:
        self._sensitivity = check_real("sensitivity", value, low=0.0)

    @property
    def loss_ratio_aware(self) -> bool:
        """Whether a spread of the losses strengthens :math:`\\lambda`."""
        return self._loss_ratio_aware

    @loss_ratio_aware.setter
    def loss_ratio_aware(self, value: bool) -> None:
        self._loss_ratio_aware = check_bool("loss_ratio_aware", value)

    def _lambda_settings(self) -> AdaptiveLambdaSettings:
        return AdaptiveLambdaSettings(
            ema_decay=self.ema_decay,
            conflict_target=self.conflict_target,
            sensitivity=self.sensitivity,
            loss_ratio_aware=self.loss_ratio_aware,
            lam_min=self.lam_min,
            lam_max=self.lam_max,
        )
