r"""
GCond (Gradient Conductor): accumulate-then-resolve arbitration of conflicting task gradients.

Reference: Limarenko and Aleksandr, *GCond: Gradient Conflict Resolution via
Accumulation-based Stabilization for Large-Scale Multi-Task Learning* (arXiv 2509.07252), and
its official implementation, ``GradientConductor`` in ``grad_conductor.py`` of
https://github.com/AlevLab-dev/GCond (commit ``1b0518a``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchjd.linalg import Matrix

from .._gramian import all_finite, nan_unless, row_norms
from .._kernels.gcond import Resolution, resolve_conflicts
from .._state import LazyState
from .._tasks import NamedTasks, default_task_names
from .._torchjd_compat import MatrixWeightingBase, NonDifferentiable
from .._validation import check_input
from ._parameters import GCondParameters
from ._statistics import GCondStatistics
from ._store import Store, checkpoint_form, grown_store, store_from_checkpoint, store_products


class GCondWeighting(
    GCondParameters, MatrixWeightingBase, NamedTasks, LazyState, NonDifferentiable
):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting`
    [:class:`~torchjd.linalg.Matrix`] of GCond, the Gradient Conductor of `GCond: Gradient
    Conflict Resolution via Accumulation-based Stabilization for Large-Scale Multi-Task Learning
    <https://arxiv.org/abs/2509.07252>`_: weights :math:`w` such that :math:`w^\top J` is the
    resolved gradient of the official implementation (its ``_project``).

    The rows of :math:`J` are the tasks' gradients, accumulated over several micro-batches by
    torchjd (see :class:`GCond`); the stability needs the previous step's resolved rows, so it is
    a weighting of the Jacobian, not of its Gramian: a ``GramianWeightedAggregator`` of it raises
    a ``TypeError`` (a square input, which a Gramian would be, is taken as a Jacobian). Each call:

    1. updates the norm averages :math:`e_k \leftarrow \max(\beta e_k + (1 - \beta)\|J_k\|,
       \epsilon)` and scales the rows longer than ``norm_cap`` down to it;
    2. repeats, at most ``projection_max_iters`` times (:math:`2m` by default): find the pair of
       current rows with the smallest cosine (rows with :math:`\|r\|^2 < \epsilon` are skipped);
       stop unless it is below the weak threshold; otherwise resolve it:

       - an *arbitrator* names a winner: a task that filled the whole winner history loses;
         otherwise the higher score wins (ties to the first), with score :math:`s_k =
         w_{stab} \max(\cos(r_k, p_k), 0) + w_{str} \frac{\|r_k\|/e_k}{\|r_i\|/e_i +
         \|r_j\|/e_j}` and :math:`p_k` the task's resolved row of the previous step;
       - *smooth logic*: the cosine is remapped to an angle :math:`\theta` (:math:`\pi` below
         the critical threshold, :math:`\frac\pi2 (1 + t^p)` in the main zone, :math:`\frac\pi2
         (1 - t)` in the weak zone) and both rows move towards orthogonality:
         :math:`r_w \mathrel{-}= \sin\theta \frac{\langle r_w, r_l\rangle}{\|r_l\|^2} r_l`,
         :math:`r_l \mathrel{-}= \sin\min(\theta, \frac\pi2) \frac{\langle r_w,
         r_l\rangle}{\|r_w\|^2} r_w`;
       - *legacy logic*: critical zone, the loser is zeroed; main zone, the loser is projected
         off the winner (PCGrad); weak zone, both rows are projected off each other, without
         arbitration. Winners of the critical and main zones (all winners in smooth mode) enter
         the history;
    3. returns :math:`w = C^\top \mathbf 1` where the resolved rows are :math:`R = C J`.

    Everything after the products :math:`J J^\top` and :math:`J P^\top` runs on :math:`m \times
    m` matrices, in coefficient space, instead of on :math:`n`-dimensional gradients; the
    reference's pair search costs :math:`O(m^3 n)` per step.

    State, in buffers: the last two Jacobians, :math:`2 m \times n` values (the previous
    resolved rows are :math:`P = C_{prev} J_{prev}`, so :math:`J P^\top` costs one :math:`m
    \times m` product more than :math:`J J_{prev}^\top`; the second half receives the current
    Jacobian, and becomes the previous one only if the step is finite), the previous coefficients
    and squared norms, the norm averages, the winner history (a ring buffer) and counters. A
    checkpoint holds the previous Jacobian only. A Jacobian with inf or NaN leaves the state
    untouched and gives NaN weights. The number of resolution iterations and the smallest
    cosine of the last call are :attr:`proj_iters` and :attr:`min_cosine_sim`, for monitoring;
    :meth:`stats` gives all of the official statistics.

    **Tasks by name.** With :attr:`tasks` set, a change of tasks resets nothing. Per task name:
    the norm average (a new task starts at 1.0, the official initial value), the previous
    resolved row (each row of the store is tagged with its task) and the winner history's
    entries, which hold names, not positions. The stability score of a task present in this call
    and in the previous one reads its own previous row, wherever it was; a task absent from the
    previous call has none, as at the official first step (:math:`p_k = 0`, stability 0). The
    momentum (in :class:`GCond`) and the step count are shared.
    """

    # Its row statistics are sums and maxima over the columns, reduced by over_all_columns: in a
    # multi-process step it runs on each rank's block of columns (see the step engine).
    splits_over_columns: ClassVar[bool] = True
    _state_migrations = (store_from_checkpoint,)
    _state_names = (
        "jacobians",
        "region_tasks",
        "previous_half",
        "previous_coefficients",
        "previous_norms_sq",
        "norm_ema",
        "winner_history",
        "winner_count",
        "step_count",
    )
    _per_task_names = ("norm_ema",)
    jacobians: Tensor
    region_tasks: Tensor
    previous_half: Tensor
    previous_coefficients: Tensor
    previous_norms_sq: Tensor
    norm_ema: Tensor
    winner_history: Tensor
    winner_count: Tensor
    step_count: Tensor
    proj_iters: Tensor | None
    min_cosine_sim: Tensor | None
    last_zone: Tensor
    last_winner: Tensor
    last_norms: Tensor
    last_norm_ema: Tensor

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
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self._set_hyperparameters(locals())
        self._register_state()
        # The statistics of the last call, for monitoring (not state: not in checkpoints).
        for name in ("proj_iters", "min_cosine_sim", "last_zone", "last_winner", "last_norms"):
            self.register_buffer(name, None, persistent=False)
        self.register_buffer("last_norm_ema", None, persistent=False)
        self._last_tasks: tuple[Hashable, ...] | None = None

    def _state_sizes(self, count: int) -> tuple[int, ...]:
        rows, n = self.jacobians.shape
        return (rows // 2, n)[:count]

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        checkpoint_form(destination, prefix)

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        m, n = sizes
        device = like.device

        def counter() -> Tensor:
            return torch.zeros((), dtype=torch.int64, device=device)

        return {
            "jacobians": torch.zeros(2 * m, n, dtype=like.dtype, device=device),
            "region_tasks": torch.full((2 * m,), -1, dtype=torch.int64, device=device),
            "previous_half": counter(),
            # float64, as the m x m resolution: the squared norms of float32 rows longer than
            # 1.8e19 do not fit float32.
            "previous_coefficients": torch.eye(m, dtype=torch.float64, device=device),
            "previous_norms_sq": torch.zeros(m, dtype=torch.float64, device=device),
            "norm_ema": torch.ones(m, dtype=torch.float64, device=device),
            "winner_history": torch.full((self.dominance_window,), -1, device=device),
            "winner_count": counter(),
            "step_count": counter(),
        }

    def forward(self, matrix: Matrix, /) -> Tensor:
        check_input(matrix, self, gramian=False)
        m, n = matrix.shape
        rows = self._ensure_state((m, n), matrix)
        if m > self.jacobians.shape[0] // 2:  # more named tasks than the regions have rows
            with torch.inference_mode(False):
                grown = grown_store(self._store(), m)
            self.jacobians, self.region_tasks = grown.jacobians, grown.region_tasks
            self.previous_coefficients = grown.previous_coefficients
            self.previous_norms_sq = grown.previous_norms_sq
        if self.winner_history.numel() != self.dominance_window:  # the window was changed
            self.winner_history = torch.full((self.dominance_window,), -1, device=matrix.device)
            self.winner_count = torch.zeros_like(self.winner_count)

        task_ids = torch.arange(m, device=matrix.device) if rows is None else rows
        gramian, cross, previous_norms_sq = store_products(matrix.detach(), self._store(), task_ids)
        finite = all_finite(gramian)
        norm_ema = self._task_rows("norm_ema", rows)
        norms = row_norms(gramian).to(torch.float64)
        if m > 1:
            beta = self.norm_ema_beta
            norm_ema = (beta * norm_ema + (1.0 - beta) * norms).clamp(min=self.eps)
            resolution = resolve_conflicts(
                gramian,
                cross,
                previous_norms_sq,
                norm_ema,
                self.winner_history,
                self.winner_count,
                self._settings(m),
                task_ids=task_ids,
            )
        else:  # the reference returns a single task's gradient untouched
            resolution = Resolution(
                coefficients=torch.ones(1, 1, dtype=gramian.dtype, device=gramian.device),
                history=self.winner_history,
                history_count=self.winner_count,
                proj_iters=torch.zeros((), dtype=gramian.dtype, device=gramian.device),
                min_cosine_sim=torch.ones((), dtype=gramian.dtype, device=gramian.device),
                last_zone=torch.zeros((), dtype=torch.int64, device=gramian.device),
                last_winner=torch.full((), -1, dtype=torch.int64, device=gramian.device),
            )

        exact = resolution.coefficients.to(device=gramian.device, dtype=torch.float64)
        coefficients = exact.to(gramian.dtype)
        resolved_norms_sq = ((exact @ gramian.to(torch.float64)) * exact).sum(dim=1)
        capacity = self.jacobians.shape[0] // 2
        padding = (0, capacity - m)
        self._commit(
            finite,
            rows,
            previous_half=1 - self.previous_half,
            previous_coefficients=nn.functional.pad(exact, padding + padding),
            previous_norms_sq=nn.functional.pad(resolved_norms_sq, padding),
            norm_ema=norm_ema,
            winner_history=resolution.history.to(gramian.device),
            winner_count=resolution.history_count.to(gramian.device),
            step_count=self.step_count + 1,
        )
        self.proj_iters = resolution.proj_iters
        self.min_cosine_sim = resolution.min_cosine_sim
        self.last_zone, self.last_winner = resolution.last_zone, resolution.last_winner
        self.last_norms = norms
        self.last_norm_ema, self._last_tasks = norm_ema, self._tasks  # checked above
        return nan_unless(finite, coefficients.sum(dim=0)).to(matrix.dtype)

    def stats(self, final_grad_norm: Tensor | None = None) -> GCondStatistics:
        """The statistics of the last call (see :class:`GCondStatistics`), without a host read."""

        if self.proj_iters is None or self.min_cosine_sim is None:
            raise ValueError(f"`{type(self).__name__}` has no statistics before its first call.")
        m = self.last_norms.shape[0]
        tasks = self._last_tasks or default_task_names(m)
        return GCondStatistics(
            step=self.step_count.clone(),
            proj_iters=self.proj_iters,
            min_cosine_sim=self.min_cosine_sim,
            zone=self.last_zone,
            winner=self.last_winner,
            raw_norms=self.last_norms,
            norm_ema=self.last_norm_ema,
            final_grad_norm=final_grad_norm,
            tasks=tasks,
            names=self.known_tasks or tasks,
        )

    def _initial_task_rows(
        self, count: int, sizes: tuple[int, ...], like: Tensor
    ) -> dict[str, Tensor]:
        return {"norm_ema": torch.ones(count, dtype=torch.float64, device=like.device)}

    def _store(self) -> Store:
        return Store(
            jacobians=self.jacobians,
            region_tasks=self.region_tasks,
            previous_half=self.previous_half,
            previous_coefficients=self.previous_coefficients,
            previous_norms_sq=self.previous_norms_sq,
        )
