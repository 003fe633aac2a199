r"""
Golden Pendulum with an adaptive :math:`\lambda`, as ``golden_pendulum.pro.AdaptiveLambda``.

Reference: the package ``golden-pendulum-mtl`` 0.2.0 (``golden_pendulum.pro.adaptive``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import PSDMatrix

from ._adaptive_lambda import (
    AdaptiveLambdaParameters,
    adaptive_lambda_step,
    conflicting_fraction,
    step_loss_ratio,
)
from ._aggregator_bases import (
    Forwarded,
    ForwardedConverting,
    GramianAggregator,
    forwards_hyperparameters,
)
from ._golden_pendulum import _MIN_NORM, golden_pendulum_weights, golden_ratio_weights
from ._gramian import accumulation_dtype, all_finite, nan_unless, normalize_gramian
from ._state import LazyState
from ._tasks import NamedTasks, TaskNames
from ._torchjd_compat import GramianWeightingBase, NonDifferentiable
from ._validation import check_input


class AdaptiveGoldenPendulumWeighting(
    AdaptiveLambdaParameters, GramianWeightingBase, NamedTasks, LazyState, NonDifferentiable
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
        self._set_hyperparameters(locals())
        self._losses: Tensor | None = None
        self._register_state()

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


@forwards_hyperparameters
class AdaptiveGoldenPendulum(
    AdaptiveLambdaParameters, GramianAggregator, Stateful, NonDifferentiable
):
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
        super().__init__(self._weighting_class.from_arguments(locals()))

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
