r"""
GCond, the aggregator: the bias-corrected momentum of the resolved gradient of
:class:`~._weighting.GCondWeighting`.

Reference: ``GradientConductor`` in ``grad_conductor.py`` of https://github.com/AlevLab-dev/GCond
(commit ``1b0518a``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torchjd.aggregation import Aggregator
from torchjd.linalg import Matrix

from .._aggregator_bases import (
    Forwarded,
    ForwardedConverting,
    checked_call,
    forwards_hyperparameters,
)
from .._gramian import accumulation_dtype, all_finite, combine_rows
from .._kernels._paths import chosen_path
from .._state import LazyState
from .._tasks import TaskNames
from .._torchjd_compat import NonDifferentiable
from .._validation import check_real
from ._parameters import GCondParameters
from ._statistics import GCondStatistics
from ._weighting import GCondWeighting


@forwards_hyperparameters
class GCond(GCondParameters, Aggregator, LazyState, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Aggregator` of GCond, the
    Gradient Conductor of `GCond: Gradient Conflict Resolution via Accumulation-based
    Stabilization for Large-Scale Multi-Task Learning <https://arxiv.org/abs/2509.07252>`_
    (official implementation: `AlevLab-dev/GCond <https://github.com/AlevLab-dev/GCond>`_).

    It resolves the conflicts between the tasks' accumulated gradients with
    :class:`GCondWeighting` and returns the bias-corrected momentum of the resolved gradient
    :math:`g_t = w^\top J`, as the reference writes into ``.grad``:

    .. math::

        m_t = \beta m_{t-1} + (1 - \beta) g_t, \qquad \text{update} = m_t / (1 - \beta^t)

    With ``momentum_beta=0`` the update is :math:`g_t` itself and no momentum is stored.

    **No weights.** The momentum carries the earlier steps' gradients, so the update is not a
    combination :math:`w^\top J` of this step's rows: GCond is an
    :class:`~torchjd.aggregation.Aggregator`, not a
    :class:`~torchjd.aggregation.WeightedAggregator`, whatever ``momentum_beta``, and
    ``jac_to_grad`` returns ``None`` for it, as for any aggregator without weights (and so do
    the trainers' steps; the weight loggers refuse it). The arbitration's weights :math:`w` of
    :math:`g_t` are :attr:`resolution_weights`, under their own name: with ``momentum_beta=0``
    the update is exactly :math:`w^\top J`. For weights from ``jac_to_grad`` without momentum,
    use ``WeightedAggregator(GCondWeighting(...))``, whose update is :math:`g_t`.

    **Accumulate, then resolve.** The accumulation is torchjd's own: ``backward`` and
    ``mtl_backward`` add to the ``.jac`` fields, and one ``jac_to_grad`` resolves what several
    micro-batches accumulated. In the reference's default mode every micro-batch computes all
    the task losses:

    .. testcode::

        import torch
        from torch.nn import Linear, ReLU, Sequential
        from torchjd.autojac import backward, jac_to_grad
        from torchjd_golden import GCond

        model = Sequential(Linear(8, 16), ReLU(), Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        gcond = GCond()
        n_micro_batches = 4

        for step in range(2):
            for _ in range(n_micro_batches):
                x, y = torch.randn(32, 8), torch.randn(32, 3)
                losses = ((model(x) - y) ** 2).mean(dim=0)  # one loss per task
                backward(losses / n_micro_batches)  # accumulates the averaged Jacobian
            jac_to_grad(model.parameters(), gcond)
            optimizer.step()
            optimizer.zero_grad()

    In the *stochastic* mode each micro-batch computes one task's loss, which
    :func:`backward_task` backpropagates into that task's row only; every task gets the same
    number of micro-batches, so each row ends up the task's averaged gradient:

    .. testcode::

        from torchjd_golden import backward_task

        n_tasks, per_task = 3, 2
        for step in range(2):
            for task in range(n_tasks):
                for _ in range(per_task):
                    x, y = torch.randn(32, 8), torch.randn(32, 3)
                    loss = ((model(x)[:, task] - y[:, task]) ** 2).mean()
                    backward_task(loss, task, n_tasks, scale=1 / per_task)
            jac_to_grad(model.parameters(), gcond)
            optimizer.step()
            optimizer.zero_grad()

    **Optimizers.** GCond's update already carries the momentum, so the optimizer should not add
    another first moment: the reference's README uses ``AdamW(..., betas=(0.0, 0.95))``. The
    reference's optional Lion update with a LARS trust ratio is an optimizer's job; the guide
    "Accumulating for GCond" shows it.

    The parameters, defaults and validation are those of the reference's constructor; see
    :class:`GCondWeighting` for the resolution.

    :param conflict_thresholds: Cosine thresholds (critical, main, weak), non-decreasing, in
        :math:`[-1, 1]`.
    :param use_smooth_logic: Smooth angle-based projection, or the legacy four-zone logic.
    :param remap_power: Exponent :math:`p > 0` of the main-zone angle remapping.
    :param dominance_window: Length of the winner history (0 turns the rule off).
    :param tie_breaking_weights: Weights (stability, strength) of the arbitration score.
    :param norm_ema_beta: Decay in :math:`[0, 1)` of the gradient-norm averages.
    :param norm_cap: Cap on each task's gradient norm, or ``None``.
    :param projection_max_iters: Most resolution iterations per step, or ``None`` for :math:`2m`.
    :param momentum_beta: Momentum :math:`\beta \in [0, 1)`.
    :param eps: Small constant of the denominators and of the zero-norm test.
    """

    weighting: GCondWeighting
    # Its row statistics are sums and maxima over the columns, reduced by over_all_columns: in a
    # multi-process step it runs on each rank's block of columns (see the step engine).
    splits_over_columns: ClassVar[bool] = True
    _state_names = ("momentum", "step_count")
    momentum: Tensor
    step_count: Tensor
    resolution_weights: Tensor | None
    """
    The weights :math:`w` of the last call's resolved gradient :math:`g_t = w^\top J`, before
    the momentum (``None`` before the first call): what :class:`GCondWeighting` returned.
    """

    def __init__(
        self,
        conflict_thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
        use_smooth_logic: bool = True,
        remap_power: float = 2.0,
        dominance_window: int = 3,
        tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
        norm_ema_beta: float = 0.95,
        norm_cap: float | None = None,
        projection_max_iters: int | None = None,
        momentum_beta: float = 0.85,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.weighting = GCondWeighting.from_arguments(locals())
        self.momentum_beta = momentum_beta
        self._register_state()
        # Not state: the last call's weights, for monitoring (not in checkpoints).
        self.register_buffer("resolution_weights", None, persistent=False)
        self._norm_of: tuple[Tensor, Tensor | None] | None = None  # for stats()

    tasks = ForwardedConverting[TaskNames | None, Sequence[Hashable] | None](GCondWeighting.tasks)
    known_tasks = Forwarded(GCondWeighting.known_tasks)

    @property
    def momentum_beta(self) -> float:
        """Momentum of the update; 0 returns the resolved gradient itself."""
        return self._momentum_beta

    @momentum_beta.setter
    def momentum_beta(self, value: float) -> None:
        self._momentum_beta = check_real("momentum_beta", value, low=0.0, high=1.0, high_open=True)

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        (n,) = sizes
        return {
            "momentum": torch.zeros(n, dtype=accumulation_dtype(like.dtype), device=like.device),
            "step_count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def __call__(self, matrix: Tensor, /) -> Tensor:
        return checked_call(self, matrix)

    def forward(self, matrix: Matrix, /) -> Tensor:
        weights = self.weighting(matrix)
        self.resolution_weights = weights
        beta = self.momentum_beta
        if beta == 0.0:
            update = combine_rows(weights, matrix)
            # Read now: the caller owns the update (the gradients may be views of it).
            self._norm_of = (torch.linalg.vector_norm(update.detach()).reshape(1), None)
            return update

        # The weighting has warned if it reset for new sizes; the momentum follows it silently.
        self._ensure_state((matrix.shape[1],), matrix, warn=False)
        # The momentum restarts with the weighting: on its first step ever or after a reset.
        restarted = self.weighting.step_count == 1
        step = torch.where(restarted, 1, self.step_count + 1)
        finite = all_finite(weights)
        if chosen_path(matrix) == "host" and bool(finite):  # CPU tensors: reads, no syncs
            # In place: no pass for the restart, and none for keeping the state of a bad step.
            momentum = self.momentum
            if bool(restarted):
                momentum.zero_()
            self._accumulate(momentum, weights, matrix, beta)
            self.step_count.copy_(step)
        else:
            momentum = torch.where(restarted, 0.0, self.momentum)
            self._accumulate(momentum, weights, matrix, beta)
            self._commit(finite, momentum=momentum, step_count=step)
        bias_correction = (1.0 - torch.pow(beta, step.to(torch.float64))).to(momentum.dtype)
        # The momentum changes in place at the next call only, which replaces this pair.
        self._norm_of = (momentum, bias_correction)
        return (momentum / bias_correction).to(matrix.dtype)

    @staticmethod
    def _accumulate(momentum: Tensor, weights: Tensor, matrix: Tensor, beta: float) -> None:
        r""":math:`m \leftarrow \beta m + (1 - \beta) w^\top J`, in place."""

        if matrix.dtype == momentum.dtype:  # one pass over J for the product and the average
            momentum.addmv_(matrix.T, weights.to(momentum.dtype), beta=beta, alpha=1.0 - beta)
        else:
            resolved = combine_rows(weights, matrix, dtype=momentum.dtype)
            momentum.mul_(beta).add_(resolved, alpha=1.0 - beta)

    def stats(self) -> GCondStatistics:
        """
        The statistics of the last call, as the official ``stats`` (see
        :class:`GCondStatistics`): tensors until :meth:`GCondStatistics.as_dict` reads them.
        """

        final_grad_norm = None
        if self._norm_of is not None:  # the norm of the last update, read from what made it
            vector, bias_correction = self._norm_of
            final_grad_norm = torch.linalg.vector_norm(vector)
            if bias_correction is not None:
                final_grad_norm = final_grad_norm / bias_correction
        return self.weighting.stats(final_grad_norm=final_grad_norm)

    def reset(self) -> None:
        """Forgets the momentum and the weighting's state."""
        super().reset()
        self.weighting.reset()
        self._norm_of = None
        self.resolution_weights = None
