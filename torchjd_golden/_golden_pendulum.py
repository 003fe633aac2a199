r"""
Golden Pendulum: golden-ratio regularised QP weights and PCGrad on normalised gradients.

Reference: Knopp (2026), *Golden Pendulum Multi-Task Learning: Anti-Resonance Equilibria for
Gradient Balancing in Multi-Head Transformer Training*, and its package ``golden-pendulum-mtl``
0.2.0 (``golden_pendulum.core`` and ``golden_pendulum.pro.AdaptiveLambda``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import mul

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import PSDMatrix

from ._aggregator_bases import GramianAggregator, forwarded
from ._gramian import (
    accumulation_dtype,
    all_finite,
    nan_unless,
    normalize_gramian,
    pcgrad_coefficients,
    runs_on_host,
)
from ._state import LazyState
from ._torchjd_compat import GramianWeightingBase, NonDifferentiable
from ._validation import check_bool, check_input, check_int, check_real

PHI = (1.0 + math.sqrt(5.0)) / 2.0
"""The golden ratio :math:`\\varphi = (1 + \\sqrt 5) / 2`."""

# The reference divides each gradient by max(norm, 1e-8) and adds 1e-8 in PCGrad's projection.
_MIN_NORM = 1e-8
_PROJECTION_EPS = 1e-8


def golden_ratio_weights(
    n_tasks: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""
    The golden-ratio target weights :math:`\varphi^k / \sum_{j<K} \varphi^j`, :math:`k < K`.

    Consecutive targets have the irrational ratio :math:`\varphi`; the largest goes to the last
    task. They sum to one.

    :param n_tasks: The number of tasks :math:`K \geq 1`.
    :param device: The device of the result.
    :param dtype: The dtype of the result (the default dtype when ``None``).

    >>> golden_ratio_weights(4)
    tensor([0.1056, 0.1708, 0.2764, 0.4472])
    """

    check_int("n_tasks", n_tasks, low=1)
    powers = torch.tensor([PHI**k for k in range(n_tasks)], device=device, dtype=dtype)
    return powers / powers.sum()


def solve_golden_qp(
    normalized_gramian: Tensor,
    lam: float | Tensor,
    n_iter: int,
    min_weight_fraction: float,
) -> Tensor:
    r"""
    Projected gradient descent on :math:`\alpha^\top \hat G \alpha + \lambda \|\alpha -
    \alpha^\varphi\|_1` over the simplex, started at the golden targets :math:`\alpha^\varphi`.

    Step :math:`t` is :math:`\alpha \leftarrow \alpha - \eta_t (2 \hat G \alpha + \lambda\,
    \mathrm{sign}(\alpha - \alpha^\varphi))` with :math:`\eta_t = 0.05 / (1 + 0.1 t)`, followed
    by a clamp at ``min_weight_fraction`` / m and a renormalisation, as in the reference.
    """

    m = normalized_gramian.shape[0]
    targets = golden_ratio_weights(
        m, device=normalized_gramian.device, dtype=normalized_gramian.dtype
    )
    min_weight = min_weight_fraction / m
    if runs_on_host(normalized_gramian):
        solution = _golden_qp_on_host(
            normalized_gramian.tolist(), targets.tolist(), float(lam), n_iter, min_weight
        )
        return torch.tensor(solution, dtype=normalized_gramian.dtype)

    alpha = targets.clone()
    for t in range(n_iter):
        step = 0.05 / (1.0 + 0.1 * t)
        qp_gradient = 2.0 * normalized_gramian @ alpha
        golden_gradient = lam * torch.sign(alpha - targets)
        alpha = (alpha - step * (qp_gradient + golden_gradient)).clamp(min=min_weight)
        alpha = alpha / alpha.sum()
    return alpha


def _golden_qp_on_host(
    gramian: list[list[float]], targets: list[float], lam: float, n_iter: int, min_weight: float
) -> list[float]:
    alpha = list(targets)
    for t in range(n_iter):
        step = 0.05 / (1.0 + 0.1 * t)
        # sum(map(mul, ...)) keeps the m x m product in C: this loop is the QP's whole cost.
        alpha = [
            max(a - step * (2.0 * sum(map(mul, row, alpha)) + lam * _sign(a - target)), min_weight)
            for row, a, target in zip(gramian, alpha, targets, strict=True)
        ]
        total = sum(alpha)
        alpha = [a / total for a in alpha]
    return alpha


def _sign(value: float) -> float:
    return value if math.isnan(value) else float((value > 0.0) - (value < 0.0))


def golden_pendulum_weights(
    gramian: Tensor,
    lam: float | Tensor,
    n_iter: int,
    min_weight_fraction: float,
    pcgrad: bool,
) -> tuple[Tensor, Tensor]:
    r"""
    Returns the weights :math:`w` on the rows of :math:`J` and the QP solution :math:`\alpha`.

    With :math:`\hat J = S J` the row-normalised Jacobian and :math:`C` the coefficients of the
    PCGrad pass over :math:`\hat J` prioritised by :math:`\alpha`, the reference's gradient is
    :math:`\alpha^\top C \hat J = (\alpha^\top C S) J`, so :math:`w = S C^\top \alpha`.
    """

    normalized, inverse_norms = normalize_gramian(gramian, min_norm=_MIN_NORM)
    alpha = solve_golden_qp(normalized, lam, n_iter, min_weight_fraction)
    if pcgrad:
        mixture = alpha @ pcgrad_coefficients(normalized, alpha, eps=_PROJECTION_EPS)
    else:
        mixture = alpha
    return mixture * inverse_norms, alpha


class _GoldenPendulumParameters:
    """The hyper-parameters shared by the plain and the adaptive weighting, with validation."""

    @property
    def n_iter(self) -> int:
        """Number of projected-gradient steps of the QP."""
        return self._n_iter

    @n_iter.setter
    def n_iter(self, value: int) -> None:
        self._n_iter = check_int("n_iter", value, low=0)

    @property
    def min_weight_fraction(self) -> float:
        """Every :math:`\\alpha_k` is at least ``min_weight_fraction`` / m."""
        return self._min_weight_fraction

    @min_weight_fraction.setter
    def min_weight_fraction(self, value: float) -> None:
        self._min_weight_fraction = check_real(
            "min_weight_fraction", value, low=0.0, high=1.0, low_open=True
        )

    @property
    def pcgrad(self) -> bool:
        """Whether conflicting normalised gradients are resolved by PCGrad."""
        return self._pcgrad

    @pcgrad.setter
    def pcgrad(self, value: bool) -> None:
        self._pcgrad = check_bool("pcgrad", value)


class GoldenPendulumWeighting(_GoldenPendulumParameters, GramianWeightingBase, NonDifferentiable):
    r"""
    :class:`~torchjd.aggregation.Weighting` [:class:`~torchjd.linalg.PSDMatrix`] giving the
    weights of :class:`GoldenPendulum`, from `Golden Pendulum Multi-Task Learning
    <https://pypi.org/project/golden-pendulum-mtl/>`_ (Knopp, 2026).

    From the Gramian :math:`G = J J^\top`, with :math:`d_k = \max(\|J_k\|, 10^{-8})` and the
    normalised Gramian :math:`\hat G_{ij} = G_{ij} / (d_i d_j)`:

    1. :math:`\alpha` approximately solves :math:`\min_{\alpha \in \Delta} \alpha^\top \hat G
       \alpha + \lambda \|\alpha - \alpha^\varphi\|_1` by ``n_iter`` projected-gradient steps from
       the golden-ratio targets :math:`\alpha^\varphi_k = \varphi^k / \sum_j \varphi^j`
       (:func:`golden_ratio_weights`), with every :math:`\alpha_k \geq` ``min_weight_fraction``
       / m;
    2. if ``pcgrad``, PCGrad runs over the normalised rows :math:`\hat J_k = J_k / d_k` in the
       order :math:`i < j`: the row with the lower :math:`\alpha` is projected off the other when
       they conflict (on a tie, row :math:`j`). The resolved rows are :math:`C \hat J`;
    3. the gradient is :math:`\sum_k \alpha_k (C \hat J)_k`, so the weights on the rows of
       :math:`J` are :math:`w_k = (C^\top \alpha)_k / d_k` (zero for a zero row).

    With one task the weight is :math:`1`: the raw gradient, as in the reference. The weights
    are scale-free: multiplying a row of :math:`J` by :math:`c > 0` divides its weight by
    :math:`c`, so the aggregation is unchanged.

    The QP solution of the last call is :attr:`alpha` and its :math:`\min / \max` is
    :attr:`balance_ratio`, for monitoring. A non-finite Gramian gives NaN weights.

    :param lam: Strength :math:`\lambda \geq 0` of the pull towards the golden targets.
    :param n_iter: Number of projected-gradient steps.
    :param min_weight_fraction: Floor of every :math:`\alpha_k`, as a fraction of :math:`1/m`,
        in :math:`(0, 1]`.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    """

    def __init__(
        self,
        lam: float = 0.5,
        n_iter: int = 25,
        min_weight_fraction: float = 0.02,
        pcgrad: bool = True,
    ) -> None:
        super().__init__()
        self.lam = lam
        self.n_iter = n_iter
        self.min_weight_fraction = min_weight_fraction
        self.pcgrad = pcgrad
        self.alpha: Tensor | None = None

    @property
    def lam(self) -> float:
        """Strength of the pull towards the golden-ratio targets."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_real("lam", value, low=0.0)

    @property
    def balance_ratio(self) -> Tensor | None:
        r""":math:`\min_k \alpha_k / \max_k \alpha_k` of the last call (``None`` before any)."""
        return None if self.alpha is None else self.alpha.min() / self.alpha.max()

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        check_input(gramian, self, gramian=True)
        compute_dtype = accumulation_dtype(gramian.dtype)
        working = gramian.to(compute_dtype)
        if gramian.shape[0] == 1:
            weights = torch.ones(1, dtype=compute_dtype, device=gramian.device)
            alpha = weights
        else:
            weights, alpha = golden_pendulum_weights(
                working, self.lam, self.n_iter, self.min_weight_fraction, self.pcgrad
            )
        self.alpha = alpha
        return nan_unless(all_finite(working), weights).to(gramian.dtype)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(lam={self.lam!r}, n_iter={self.n_iter!r}, "
            f"min_weight_fraction={self.min_weight_fraction!r}, pcgrad={self.pcgrad!r})"
        )


class GoldenPendulum(GramianAggregator, NonDifferentiable):
    r"""
    :class:`~torchjd.aggregation.GramianWeightedAggregator` from `Golden Pendulum Multi-Task
    Learning <https://pypi.org/project/golden-pendulum-mtl/>`_ (Knopp, 2026): golden-ratio
    regularised QP weights over normalised gradients, then PCGrad. See
    :class:`GoldenPendulumWeighting` for the maths.

    Its output equals the gradient that ``golden_pendulum.golden_nash_backward`` writes, so it
    replaces that call in any torchjd loop (``backward`` or ``mtl_backward``, then
    ``jac_to_grad``), and its weighting works with the autogram ``Engine``.

    :param lam: Strength :math:`\lambda \geq 0` of the pull towards the golden targets.
    :param n_iter: Number of projected-gradient steps.
    :param min_weight_fraction: Floor of every :math:`\alpha_k`, as a fraction of :math:`1/m`.
    :param pcgrad: Whether to resolve conflicts with PCGrad.

    .. note::
        The aggregation is not permutation invariant (the targets grow with the task index and
        PCGrad visits pairs in order), and it is invariant, not linear, under a positive scaling
        of the rows.
    """

    gramian_weighting: GoldenPendulumWeighting

    def __init__(
        self,
        lam: float = 0.5,
        n_iter: int = 25,
        min_weight_fraction: float = 0.02,
        pcgrad: bool = True,
    ) -> None:
        super().__init__(GoldenPendulumWeighting(lam, n_iter, min_weight_fraction, pcgrad))

    lam = forwarded("lam")
    n_iter = forwarded("n_iter")
    min_weight_fraction = forwarded("min_weight_fraction")
    pcgrad = forwarded("pcgrad")
    alpha = forwarded("alpha", "The QP solution :math:`\\alpha` of the last call.")
    balance_ratio = forwarded("balance_ratio", "See :attr:`GoldenPendulumWeighting.balance_ratio`.")

    def __repr__(self) -> str:
        return repr(self.gramian_weighting).replace("Weighting", "", 1)


def _check_bounds(lam_min: float, lam_max: float) -> None:
    if lam_min > lam_max:
        raise ValueError(
            f"Attributes `lam_min` and `lam_max` must satisfy lam_min <= lam_max. Found "
            f"lam_min={lam_min!r} and lam_max={lam_max!r}."
        )


class AdaptiveGoldenPendulumWeighting(
    _GoldenPendulumParameters, GramianWeightingBase, LazyState, NonDifferentiable
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
        return self.alpha.min() / self.alpha.max() if self._has_state else None

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

        rows, columns = torch.triu_indices(m, m, offset=1, device=working.device)
        conflicts = (normalized[rows, columns] < 0.0).sum().to(torch.float64) / rows.numel()
        decay = self.ema_decay
        conflict_ema = decay * self.conflict_ema + (1.0 - decay) * conflicts
        loss_ratio_ema = self.loss_ratio_ema
        if losses is not None:
            losses = losses.to(device=working.device, dtype=torch.float64)
            finite = finite & all_finite(losses)
            loss_ratio = losses.max() / losses.min().clamp(min=1e-10)
            loss_ratio_ema = decay * loss_ratio_ema + (1.0 - decay) * loss_ratio

        lam = self.lam * torch.exp(self.sensitivity * (conflict_ema - self.conflict_target) * 0.1)
        if self.loss_ratio_aware:
            boost = 1.0 + 0.1 * torch.log(loss_ratio_ema.clamp(min=1.0))
            lam = torch.where(loss_ratio_ema > 1.0, lam * boost, lam)
        lam = lam.clamp(min=self.lam_min, max=self.lam_max)

        weights, alpha = golden_pendulum_weights(
            working, lam, self.n_iter, self.min_weight_fraction, self.pcgrad
        )
        self._commit(
            finite,
            alpha=alpha,
            lam=lam,
            conflict_ema=conflict_ema,
            loss_ratio_ema=loss_ratio_ema,
            step_count=self.step_count + 1,
        )
        return nan_unless(finite, weights).to(gramian.dtype)

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
            AdaptiveGoldenPendulumWeighting(
                lam_init,
                lam_min,
                lam_max,
                ema_decay,
                conflict_target,
                sensitivity,
                loss_ratio_aware,
                n_iter,
                min_weight_fraction,
                pcgrad,
            )
        )

    lam_init = forwarded("lam_init")
    lam_min = forwarded("lam_min")
    lam_max = forwarded("lam_max")
    ema_decay = forwarded("ema_decay")
    conflict_target = forwarded("conflict_target")
    sensitivity = forwarded("sensitivity")
    loss_ratio_aware = forwarded("loss_ratio_aware")
    n_iter = forwarded("n_iter")
    min_weight_fraction = forwarded("min_weight_fraction")
    pcgrad = forwarded("pcgrad")
    losses = forwarded("losses")
    current_lam = forwarded("current_lam")
    conflict_ratio = forwarded("conflict_ratio")
    loss_ratio = forwarded("loss_ratio")
    alpha = forwarded("alpha")
    balance_ratio = forwarded("balance_ratio")

    def reset(self) -> None:
        """Restores the initial state of the weighting, :math:`\\lambda` included."""
        self.gramian_weighting.reset()

    def __repr__(self) -> str:
        return repr(self.gramian_weighting).replace("Weighting", "", 1)
