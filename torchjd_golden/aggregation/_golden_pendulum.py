r"""
Golden Pendulum: golden-ratio regularised QP weights and PCGrad on normalised gradients.

Reference: Knopp (2026), *Golden Pendulum Multi-Task Learning: Anti-Resonance Equilibria for
Gradient Balancing in Multi-Head Transformer Training*, and its package ``golden-pendulum-mtl``
0.2.0 (``golden_pendulum.core`` and ``golden_pendulum.pro.AdaptiveLambda``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor
from torchjd.linalg import PSDMatrix

from ._aggregator_bases import (
    Forwarded,
    ForwardedConverting,
    GramianAggregator,
    forwards_hyperparameters,
)
from ._gramian import accumulation_dtype, all_finite, nan_unless, normalize_gramian
from ._kernels.golden_qp import solve_golden_qp
from ._kernels.pcgrad import pcgrad_combination
from ._parameters import HyperParameters
from ._tasks import NamedTasks, TaskNames
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
    task. They sum to one. Where :math:`\sum_j \varphi^j` would overflow ``dtype`` (float32 from
    :math:`K = 184`), they are computed in float64 as :math:`\varphi^{k-K+1}`, relative to the
    largest, and the smallest targets of many tasks underflow to zero; below, exactly as
    golden-pendulum-mtl computes them.

    :param n_tasks: The number of tasks :math:`K \geq 1`.
    :param device: The device of the result.
    :param dtype: The dtype of the result (the default dtype when ``None``).

    >>> golden_ratio_weights(4)
    tensor([0.1056, 0.1708, 0.2764, 0.4472])
    """

    check_int("n_tasks", n_tasks, low=1)
    dtype = dtype or torch.get_default_dtype()
    if PHI ** (n_tasks + 1) < torch.finfo(dtype).max:  # the sum of the powers fits dtype
        powers = torch.tensor([PHI**k for k in range(n_tasks)], device=device, dtype=dtype)
        return powers / powers.sum()
    relative = PHI ** (torch.arange(n_tasks, dtype=torch.float64) - (n_tasks - 1))
    return (relative / relative.sum()).to(device=device, dtype=dtype)


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
    m = gramian.shape[0]
    targets = golden_ratio_weights(m, device=gramian.device, dtype=gramian.dtype)
    alpha = solve_golden_qp(normalized, targets, lam, n_iter, min_weight_fraction / m)
    return pendulum_weights(normalized, inverse_norms, alpha, pcgrad), alpha


def pendulum_weights(
    normalized: Tensor, inverse_norms: Tensor, alpha: Tensor, pcgrad: bool
) -> Tensor:
    r"""
    The weights :math:`w = S C^\top \alpha` on the rows of :math:`J`, given the normalised
    Gramian, the inverse norms :math:`S` (:func:`normalize_gramian`) and the priorities
    :math:`\alpha` of the PCGrad pass (:math:`C = I` without it).
    """

    mixture = pcgrad_combination(normalized, alpha, alpha, eps=_PROJECTION_EPS) if pcgrad else alpha
    return mixture * inverse_norms


class GoldenQPParameters(HyperParameters):
    """The hyper-parameters of the golden QP and its PCGrad pass, which every variant shares."""

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
        self._min_weight_fraction = check_real("min_weight_fraction", value, low=0.0, high=1.0)

    @property
    def pcgrad(self) -> bool:
        """Whether conflicting normalised gradients are resolved by PCGrad."""
        return self._pcgrad

    @pcgrad.setter
    def pcgrad(self, value: bool) -> None:
        self._pcgrad = check_bool("pcgrad", value)


class GoldenPendulumParameters(GoldenQPParameters):
    """The hyper-parameters of :class:`GoldenPendulumWeighting` and :class:`GoldenPendulum`."""

    @property
    def lam(self) -> float:
        """Strength of the pull towards the golden-ratio targets."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_real("lam", value, low=0.0)


class GoldenPendulumWeighting(
    GoldenPendulumParameters, NamedTasks, GramianWeightingBase, NonDifferentiable
):
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
        in :math:`[0, 1]` (0: no floor; should a step then clamp every :math:`\alpha_k` to
        zero, :math:`\alpha` keeps its previous value, where the reference divides by zero).
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
        self._set_hyperparameters(locals())
        self.alpha: Tensor | None = None

    @property
    def balance_ratio(self) -> Tensor | None:
        r""":math:`\min_k \alpha_k / \max_k \alpha_k` of the last call (``None`` before any)."""
        return None if self.alpha is None else self.alpha.min() / self.alpha.max()

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        check_input(gramian, self, gramian=True)
        self._call_tasks(gramian.shape[0])  # names are only checked: there is no state
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


@forwards_hyperparameters
class GoldenPendulum(GoldenPendulumParameters, GramianAggregator, NonDifferentiable):
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
        super().__init__(GoldenPendulumWeighting.from_arguments(locals()))

    alpha = Forwarded[Tensor | None]("alpha", "The QP solution :math:`\\alpha` of the last call.")
    balance_ratio = Forwarded(GoldenPendulumWeighting.balance_ratio)
    tasks = ForwardedConverting[TaskNames | None, Sequence[Hashable] | None](
        GoldenPendulumWeighting.tasks
    )
