r"""
GABA: gradient-aware balanced adaptation, inverse gradient-norm task weights.

Reference: the ``GABALoss`` module (``grace/core/gaba.py``) of the GRACE predictive-maintenance
paper, with the :math:`K`-task formula of its equation 4.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import PSDMatrix

from ._aggregator_bases import (
    Forwarded,
    ForwardedConverting,
    GramianAggregator,
    forwards_hyperparameters,
)
from ._gramian import accumulation_dtype, all_finite, nan_unless, row_norms
from ._parameters import HyperParameters
from ._state import LazyState
from ._tasks import NamedTasks, TaskNames
from ._torchjd_compat import GramianWeightingBase, NonDifferentiable
from ._validation import check_input, check_int, check_real

# The reference adds this to the sum of the norms before dividing by it.
_NORM_SUM_EPS = 1e-12


def inverse_norm_weights(norms: Tensor) -> Tensor:
    r"""
    The raw GABA weights :math:`\lambda_k = (\sum_j g_j - g_k) / ((K - 1) \sum_j g_j)`: the
    smaller a task's gradient norm :math:`g_k`, the larger its weight. They sum to one; with a
    single task the weight is one.
    """

    n_tasks = norms.shape[0]
    if n_tasks == 1:
        return torch.ones_like(norms)
    total = norms.sum() + _NORM_SUM_EPS
    return (total - norms) / ((n_tasks - 1) * total)


class GABAParameters(HyperParameters):
    """The hyper-parameters of :class:`GABAWeighting` and :class:`GABA`."""

    @property
    def beta(self) -> float:
        """Decay of the moving average of the raw weights."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = check_real("beta", value, low=0.0, high=1.0)

    @property
    def warmup_steps(self) -> int:
        """Number of first calls with uniform weights."""
        return self._warmup_steps

    @warmup_steps.setter
    def warmup_steps(self, value: int) -> None:
        self._warmup_steps = check_int("warmup_steps", value, low=0)

    @property
    def min_weight(self) -> float:
        """Floor of every weight before renormalisation."""
        return self._min_weight

    @min_weight.setter
    def min_weight(self, value: float) -> None:
        self._min_weight = check_real("min_weight", value, low=0.0, high=1.0, high_open=True)


class GABAWeighting(GABAParameters, GramianWeightingBase, NamedTasks, LazyState, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting`
    [:class:`~torchjd.linalg.PSDMatrix`] giving the weights of :class:`GABA`: an exponential
    moving average of inverse gradient-norm weights, floored and renormalised.

    With :math:`g_k = \sqrt{G_{kk}}` the gradient norm of task :math:`k` among :math:`K`, each
    call increments the step counter :math:`t` and, once :math:`t >` ``warmup_steps``, updates

    .. math::

        \lambda_k = \frac{\sum_j g_j - g_k}{(K - 1) \sum_j g_j}, \qquad
        e \leftarrow \beta e + (1 - \beta) \lambda, \qquad
        w = \frac{\max(e, w_{\min})}{\sum_k \max(e_k, w_{\min})}

    where :math:`e` starts uniform. During warm-up the weights are uniform and :math:`e` is left
    alone. With :math:`K = 1` the weight is one. The state keeps the unfloored average
    (buffers ``ema_weights`` and ``step_count``).

    Only the diagonal of the Gramian is used, so the weighting works with the autogram
    ``Engine``. Uniform scaling of the Jacobian leaves the weights unchanged. A non-finite
    Gramian leaves the state untouched and gives NaN weights.

    **Tasks by name.** Without names, a change of :math:`K` resets the state with a warning. With
    :attr:`tasks` set, :math:`e` is kept per task name and the step count is shared: a task absent
    from a call keeps its average, a new task starts at :math:`1/K` (:math:`K` the tasks of the
    call), and the averages of the call's tasks are renormalised to sum to one over them before
    the update, since :math:`\lambda` is a distribution over them.

    :param beta: Decay :math:`\beta \in [0, 1]` of the moving average.
    :param warmup_steps: Number of first calls with uniform weights.
    :param min_weight: Floor :math:`w_{\min} \in [0, 1)` applied before renormalising.
    """

    _state_names = ("ema_weights", "step_count")
    _per_task_names = ("ema_weights",)
    _keeps_state_dtype = True
    ema_weights: Tensor
    step_count: Tensor

    def __init__(
        self, beta: float = 0.99, warmup_steps: int = 100, min_weight: float = 0.05
    ) -> None:
        super().__init__()
        self._set_hyperparameters(locals())
        self._register_state()

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        (n_tasks,) = sizes
        return {
            "ema_weights": torch.full(
                (n_tasks,), 1.0 / n_tasks, dtype=like.dtype, device=like.device
            ),
            "step_count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        check_input(gramian, self, gramian=True)
        n_tasks = gramian.shape[0]
        working = gramian.to(accumulation_dtype(gramian.dtype))
        rows = self._ensure_state((n_tasks,), working)
        stored = self._task_rows("ema_weights", rows)
        ema = self._over_call_tasks(stored)
        finite = all_finite(working)
        step = self.step_count + 1
        in_warmup = step <= self.warmup_steps

        raw = inverse_norm_weights(row_norms(working).to(ema.dtype))
        new_ema = torch.where(in_warmup, stored, self.beta * ema + (1.0 - self.beta) * raw)
        floored = new_ema.clamp(min=self.min_weight)
        uniform = torch.full_like(ema, 1.0 / n_tasks)
        weights = torch.where(in_warmup, uniform, floored / floored.sum())

        self._commit(finite, rows, ema_weights=new_ema, step_count=step)
        return nan_unless(finite, weights).to(gramian.dtype)


@forwards_hyperparameters
class GABA(GABAParameters, GramianAggregator, Stateful, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.GramianWeightedAggregator` giving each
    task a weight that grows as its gradient norm shrinks (GABA, from the GRACE
    predictive-maintenance paper), smoothed by a moving average after a warm-up. See
    :class:`GABAWeighting` for the maths.

    :param beta: Decay of the moving average.
    :param warmup_steps: Number of first calls with uniform weights.
    :param min_weight: Floor applied to every weight before renormalising.

    .. note::
        The weights are permutation equivariant on a fresh instance (so the aggregation is
        permutation invariant), but they are not linear under a scaling of the rows: scaling a
        row changes its norm and hence every weight.
    """

    gramian_weighting: GABAWeighting

    def __init__(
        self, beta: float = 0.99, warmup_steps: int = 100, min_weight: float = 0.05
    ) -> None:
        super().__init__(GABAWeighting.from_arguments(locals()))

    tasks = ForwardedConverting[TaskNames | None, Sequence[Hashable] | None](GABAWeighting.tasks)
    known_tasks = Forwarded(GABAWeighting.known_tasks)

    def reset(self) -> None:
        """Restores the uniform moving average and the step counter of the weighting."""
        self.gramian_weighting.reset()
