r"""
Golden Pendulum with an adaptive :math:`\lambda`, as ``golden_pendulum.pro.AdaptiveLambda``.

Reference: the package ``golden-pendulum-mtl`` 0.2.0 (``golden_pendulum.pro.adaptive``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import PSDMatrix

from ._aggregator_bases import Forwarded, ForwardedConverting, GramianAggregator
from ._golden_pendulum import (
    _MIN_NORM,
    GoldenPendulumParameters,
    golden_pendulum_weights,
    golden_ratio_weights,
)
from ._gramian import accumulation_dtype, all_finite, nan_unless, normalize_gramian
from ._state import LazyState
from ._tasks import NamedTasks, TaskNames
from ._torchjd_compat import GramianWeightingBase, NonDifferentiable
from ._validation import check_bool, check_input, check_real

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


class AdaptiveGoldenPendulumWeighting(
    GoldenPendulumParameters, GramianWeightingBase, NamedTasks, LazyState, NonDifferentiable
):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting`
    [:class:`~torchjd.linalg.PSDMatrix`] of :class:`GoldenPendulumWeighting` whose :math:`\lambda`
    adapts to the conflicts between tasks and to the spread of their losses, as
    ``golden_pendulum.pro.AdaptiveLambda`` does.

    At each call with :math:`m \geq 2` tasks, before solving the QP:

    .. math::

        c &\leftarrow \beta c + (1 - \beta)\, \frac{\#\{i < j : \hat G_{ij} < 0\}}{m(m-1)/2},
        \qquad
        r \leftarrow \beta r + (1 - \beta)\, \frac{\max_k L_k}{\max(\min_k L_k, 10^{-10})} \\
        \lambda &\leftarrow \mathrm{clip}\Big(\lambda\, e^{0.1\, s\, (c - c^\ast)}
        \big(1 + 0.1 \log r\big)^{[\text{loss\_ratio\_aware},\ r > 1]},\
        \lambda_{\min}, \lambda_{\max}\Big)

    with :math:`\beta` = ``ema_decay``, :math:`s` = ``sensitivity`` and :math:`c^\ast` =
    ``conflict_target``; :math:`c` starts at :math:`c^\ast`, :math:`r` at 1 and :math:`\lambda` at
    ``lam_init``. With one task the raw gradient is returned and the state is left alone.

    **Non-positive losses.** The loss ratio is defined for positive losses: at a step whose
    smallest loss is zero or negative (a log-likelihood, a loss that reaches zero), :math:`r`
    keeps its value and :math:`\lambda` follows the conflicts alone, on every device and
    without a warning (a check would read the losses on the host). golden-pendulum-mtl divides
    by :math:`10^{-10}` instead, which drives :math:`r` to about :math:`10^{10}` and
    :math:`\lambda` to ``lam_max``; its drop-in
    (:class:`torchjd_golden.golden_pendulum.pro.AdaptiveLambda`) keeps that. For losses that can
    be negative, ``loss_ratio_aware=False`` says so.

    The per-task losses :math:`L_k` of the step are an extra input: set :attr:`losses` before each
    call (they are used once). They may be omitted when ``loss_ratio_aware=False``; :math:`r` then
    keeps its value.

    .. testcode::

        import torch
        from torch.nn import Linear, MSELoss, Sequential

        from torchjd.autojac import backward, jac_to_grad
        from torchjd_golden import AdaptiveGoldenPendulum

        model = Sequential(Linear(5, 4), Linear(4, 3))
        aggregator = AdaptiveGoldenPendulum(lam_init=0.5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        for _ in range(3):
            output = model(torch.randn(16, 5))
            losses = torch.stack([MSELoss()(output[:, k], torch.randn(16)) for k in range(3)])
            backward(losses)
            aggregator.losses = losses  # the extra input of this step
            jac_to_grad(model.parameters(), aggregator)
            optimizer.step()
            optimizer.zero_grad()

        print(f"lambda = {float(aggregator.current_lam):.3f}")

    .. testoutput::
        :options: +ELLIPSIS

        lambda = ...

    State (buffers ``alpha``, ``lam``, ``conflict_ema``, ``loss_ratio_ema``, ``step_count``)
    survives ``state_dict`` round trips; a non-finite Gramian or loss leaves it untouched and
    gives NaN weights; :meth:`reset` restores the initial state, :math:`\lambda` included (the
    reference's ``reset`` keeps :math:`\lambda`).

    **Tasks by name.** Without names, a change of :math:`m` resets the state with a warning. With
    :attr:`tasks` set, nothing is per task: :math:`\lambda`, :math:`c`, :math:`r` and the step
    count are shared and continue when tasks come and go (the ratios are those of the call's
    tasks), and :attr:`alpha` is the last call's solution, in its task order.

    :param lam_init: Initial :math:`\lambda`.
    :param lam_min: Lower bound of :math:`\lambda`.
    :param lam_max: Upper bound of :math:`\lambda`.
    :param ema_decay: Decay :math:`\beta \in [0, 1)` of the conflict and loss-ratio averages.
    :param conflict_target: Conflict ratio :math:`c^\ast \in [0, 1]` at which :math:`\lambda`
        stays put.
    :param sensitivity: How fast :math:`\lambda` follows the conflict ratio.
    :param loss_ratio_aware: Whether a spread of the losses strengthens :math:`\lambda`.
    :param n_iter: Number of projected-gradient steps of the QP.
    :param min_weight_fraction: Floor of every :math:`\alpha_k`, as a fraction of :math:`1/m`.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    """

    _state_names = ("alpha", "lam", "conflict_ema", "loss_ratio_ema", "step_count")
    _keeps_state_dtype = True
    alpha: Tensor
    lam: Tensor
    conflict_ema: Tensor
    loss_ratio_ema: Tensor
    step_count: Tensor

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
        super().__init__()
        self.lam_init = lam_init
        self.lam_min = lam_min
        self.lam_max = lam_max
        self.ema_decay = ema_decay
        self.conflict_target = conflict_target
        self.sensitivity = sensitivity
        self.loss_ratio_aware = loss_ratio_aware
        self.n_iter = n_iter
        self.min_weight_fraction = min_weight_fraction
        self.pcgrad = pcgrad
        self._losses: Tensor | None = None
        self._register_state()

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

    @property
    def losses(self) -> Tensor | None:
        """The per-task losses of the coming call, shape ``[m]``; consumed by that call."""
        return self._losses

    @losses.setter
    def losses(self, value: Tensor | Sequence[Tensor | float] | None) -> None:
        if value is None:
            self._losses = None
            return
        if isinstance(value, Tensor):
            losses = value.detach()
        else:
            losses = torch.stack([torch.as_tensor(v).detach() for v in value])
        if losses.ndim != 1 or not losses.is_floating_point():
            raise ValueError(
                "Attribute `losses` must be a 1-D floating-point tensor of per-task losses. "
                f"Found shape {tuple(losses.shape)} and dtype {losses.dtype}."
            )
        self._losses = losses

    @property
    def current_lam(self) -> Tensor:
        """The current :math:`\\lambda` (``lam_init`` before the first call)."""
        return self.lam if self._has_state else torch.tensor(self.lam_init, dtype=torch.float64)

    @property
    def conflict_ratio(self) -> Tensor:
        """The moving average :math:`c` of the fraction of conflicting pairs."""
        default = torch.tensor(self.conflict_target, dtype=torch.float64)
        return self.conflict_ema if self._has_state else default

    @property
    def loss_ratio(self) -> Tensor:
        """The moving average :math:`r` of the largest over the smallest loss."""
        return self.loss_ratio_ema if self._has_state else torch.tensor(1.0, dtype=torch.float64)

    @property
    def balance_ratio(self) -> Tensor | None:
        r""":math:`\min_k \alpha_k / \max_k \alpha_k` of the last step (``None`` before any)."""
        if not self._has_state:
            return None
        return self.alpha.min() / self.alpha.max()

    def _lambda_settings(self) -> AdaptiveLambdaSettings:
        return AdaptiveLambdaSettings(
            ema_decay=self.ema_decay,
            conflict_target=self.conflict_target,
            sensitivity=self.sensitivity,
            loss_ratio_aware=self.loss_ratio_aware,
            lam_min=self.lam_min,
            lam_max=self.lam_max,
        )

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        (n_tasks,) = sizes

        def scalar(value: float) -> Tensor:
            return torch.tensor(value, dtype=torch.float64, device=like.device)

        return {
            "alpha": golden_ratio_weights(n_tasks, device=like.device, dtype=like.dtype),
            "lam": scalar(self.lam_init),
            "conflict_ema": scalar(self.conflict_target),
            "loss_ratio_ema": scalar(1.0),
            "step_count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        check_input(gramian, self, gramian=True)
        losses, self._losses = self._losses, None
        m = gramian.shape[0]
        compute_dtype = accumulation_dtype(gramian.dtype)
        working = gramian.to(compute_dtype)
        if m == 1:
            return nan_unless(all_finite(working), torch.ones_like(working[0])).to(gramian.dtype)
        if losses is None and self.loss_ratio_aware:
            raise ValueError(
                f"`{self.__class__.__name__}` with loss_ratio_aware=True needs the per-task losses "
                "of each step: set `.losses` (on the aggregator or the weighting) before the call."
            )
        if losses is not None and losses.shape != (m,):
            raise ValueError(
                f"Expected {m} losses, one per task. Found shape {tuple(losses.shape)}."
            )

        self._ensure_state((m,), working)
        normalized, _ = normalize_gramian(working, min_norm=_MIN_NORM)
        finite = all_finite(working)

        conflict_ratio = conflicting_fraction(normalized)
        ratio = None
        if losses is not None:
            losses = losses.to(device=working.device, dtype=torch.float64)
            finite = finite & all_finite(losses)
            ratio = self._step_loss_ratio(losses)
        lam, conflict_ema, loss_ratio_ema = adaptive_lambda_step(
            self.lam,
            self.conflict_ema,
            self.loss_ratio_ema,
            conflict_ratio,
            ratio,
            self._lambda_settings(),
        )

        weights, alpha = golden_pendulum_weights(
            working, lam, self.n_iter, self.min_weight_fraction, self.pcgrad
        )
        if self.alpha.shape != alpha.shape:  # named tasks came or went: the last call's solution
            self.alpha = nan_unless(finite, alpha).to(self.alpha.dtype)
        self._commit(
            finite,
            alpha=alpha,
            lam=lam,
            conflict_ema=conflict_ema,
            loss_ratio_ema=loss_ratio_ema,
            step_count=self.step_count + 1,
        )
        return nan_unless(finite, weights).to(gramian.dtype)

    @staticmethod
    def _step_loss_ratio(losses: Tensor) -> Tensor:
        """The loss ratio of a step (golden-pendulum-mtl's drop-in has the reference's)."""
        return step_loss_ratio(losses)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(lam_init={self.lam_init!r}, lam_min={self.lam_min!r}, "
            f"lam_max={self.lam_max!r}, ema_decay={self.ema_decay!r}, "
            f"conflict_target={self.conflict_target!r}, sensitivity={self.sensitivity!r}, "
            f"loss_ratio_aware={self.loss_ratio_aware!r}, n_iter={self.n_iter!r}, "
            f"min_weight_fraction={self.min_weight_fraction!r}, pcgrad={self.pcgrad!r})"
        )


class AdaptiveGoldenPendulum(GramianAggregator, Stateful, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.GramianWeightedAggregator` of
    :class:`GoldenPendulum` with the adaptive :math:`\lambda` of
    ``golden_pendulum.pro.AdaptiveLambda``. See :class:`AdaptiveGoldenPendulumWeighting`.

    Set :attr:`losses` to the per-task losses before each ``jac_to_grad`` call.
    """

    gramian_weighting: AdaptiveGoldenPendulumWeighting
    _weighting_class: ClassVar[type[AdaptiveGoldenPendulumWeighting]] = (
        AdaptiveGoldenPendulumWeighting
    )

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
        super().__init__(
            self._weighting_class(
                lam_init=lam_init,
                lam_min=lam_min,
                lam_max=lam_max,
                ema_decay=ema_decay,
                conflict_target=conflict_target,
                sensitivity=sensitivity,
                loss_ratio_aware=loss_ratio_aware,
                n_iter=n_iter,
                min_weight_fraction=min_weight_fraction,
                pcgrad=pcgrad,
            )
        )

    lam_init = Forwarded(AdaptiveGoldenPendulumWeighting.lam_init)
    lam_min = Forwarded(AdaptiveGoldenPendulumWeighting.lam_min)
    lam_max = Forwarded(AdaptiveGoldenPendulumWeighting.lam_max)
    ema_decay = Forwarded(AdaptiveGoldenPendulumWeighting.ema_decay)
    conflict_target = Forwarded(AdaptiveGoldenPendulumWeighting.conflict_target)
    sensitivity = Forwarded(AdaptiveGoldenPendulumWeighting.sensitivity)
    loss_ratio_aware = Forwarded(AdaptiveGoldenPendulumWeighting.loss_ratio_aware)
    n_iter = Forwarded(AdaptiveGoldenPendulumWeighting.n_iter)
    min_weight_fraction = Forwarded(AdaptiveGoldenPendulumWeighting.min_weight_fraction)
    pcgrad = Forwarded(AdaptiveGoldenPendulumWeighting.pcgrad)
    losses = ForwardedConverting[Tensor | None, Tensor | Sequence[Tensor | float] | None](
        AdaptiveGoldenPendulumWeighting.losses
    )
    current_lam = Forwarded(AdaptiveGoldenPendulumWeighting.current_lam)
    conflict_ratio = Forwarded(AdaptiveGoldenPendulumWeighting.conflict_ratio)
    loss_ratio = Forwarded(AdaptiveGoldenPendulumWeighting.loss_ratio)
    alpha = Forwarded[Tensor]("alpha", "The QP solution :math:`\\alpha` of the last call.")
    balance_ratio = Forwarded(AdaptiveGoldenPendulumWeighting.balance_ratio)
    tasks = ForwardedConverting[TaskNames | None, Sequence[Hashable] | None](
        AdaptiveGoldenPendulumWeighting.tasks
    )
    known_tasks = Forwarded(AdaptiveGoldenPendulumWeighting.known_tasks)

    def reset(self) -> None:
        """Restores the initial state of the weighting, :math:`\\lambda` included."""
        self.gramian_weighting.reset()
