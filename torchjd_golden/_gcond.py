r"""
GCond (Gradient Conductor): accumulate-then-resolve arbitration of conflicting task gradients.

Reference: Limarenko and Aleksandr, *GCond: Gradient Conflict Resolution via
Accumulation-based Stabilization for Large-Scale Multi-Task Learning* (arXiv 2509.07252), and
its official implementation, ``GradientConductor`` in ``grad_conductor.py`` of
https://github.com/AlevLab-dev/GCond (commit ``1b0518a``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchjd.linalg import Matrix

from ._aggregator_bases import MatrixAggregator, forwarded
from ._gramian import accumulation_dtype, all_finite, combine_rows, nan_unless, runs_on_host
from ._state import LazyState
from ._torchjd_compat import MatrixWeightingBase, NonDifferentiable
from ._validation import check_bool, check_input, check_int, check_real

_HALF_PI = math.pi / 2.0

# Elements of the Jacobian copied and multiplied at once: a chunk stays in cache between the two.
_CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class ResolveSettings:
    """The hyper-parameters of the conflict resolution, as the reference names them."""

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
    """The outcome of one resolution: resolved rows are ``coefficients @ J``."""

    coefficients: Tensor
    history: Tensor
    history_count: Tensor
    proj_iters: Tensor
    min_cosine_sim: Tensor


def resolve_conflicts(
    gramian: Tensor,
    cross: Tensor,
    previous_norms_sq: Tensor,
    norm_ema: Tensor,
    history: Tensor,
    history_count: Tensor,
    settings: ResolveSettings,
) -> Resolution:
    r"""
    Runs the reference's ``_project`` loop in coefficient space.

    :param gramian: :math:`G = J J^\top`, the inner products of this step's rows.
    :param cross: :math:`X = J P^\top`, with :math:`P` the previous step's resolved rows, for
        the stability score :math:`\langle r_i, p_i \rangle = (C X)_{ii}`.
    :param previous_norms_sq: :math:`\|p_i\|^2`.
    :param norm_ema: The per-task norm averages, already updated with this step's norms.
    :param history: The winner history as a ring buffer: the :math:`k`-th winner ever appended
        is at position :math:`k` mod ``dominance_window``.
    :param history_count: How many winners were ever appended.
    """

    resolver = _HostResolver if runs_on_host(gramian) else _DeviceResolver
    return resolver(
        gramian, cross, previous_norms_sq, norm_ema, history, history_count, settings
    ).run()


def _effective_angle(cosine: float, settings: ResolveSettings) -> float:
    """The reference's ``_get_effective_alpha``: the conflict angle remapped by the zones."""

    critical, main, weak = settings.conflict_thresholds
    c = min(max(cosine, -1.0), 1.0)
    if c >= main:
        t = min(max((c - main) / (weak - main + settings.eps), 0.0), 1.0)
        return _HALF_PI * (1.0 - t)
    if c > critical:
        t = (c - main) / (critical - main + settings.eps)
        return _HALF_PI + _HALF_PI * math.pow(t, settings.remap_power)
    return math.pi


class _HostResolver:
    """The resolution loop on Python floats: the inner products are tracked, never recomputed."""

    def __init__(
        self,
        gramian: Tensor,
        cross: Tensor,
        previous_norms_sq: Tensor,
        norm_ema: Tensor,
        history: Tensor,
        history_count: Tensor,
        settings: ResolveSettings,
    ) -> None:
        self.settings = settings
        self.cross: list[list[float]] = cross.tolist()
        self.previous_norms = [math.sqrt(max(v, 0.0)) for v in previous_norms_sq.tolist()]
        self.norm_ema: list[float] = norm_ema.tolist()
        self.ring: list[int] = history.tolist()
        self.count = int(history_count)
        window = settings.dominance_window
        first = max(0, self.count - window)
        self.winners = [self.ring[k % window] for k in range(first, self.count)] if window else []

        rows: list[list[float]] = gramian.tolist()
        m = len(rows)
        scale = [1.0] * m
        if settings.norm_cap is not None:
            for k in range(m):
                norm = math.sqrt(max(rows[k][k], 0.0))
                if norm > settings.norm_cap:
                    scale[k] = settings.norm_cap / (norm + settings.eps)
        self.coefficients = [[scale[a] if a == b else 0.0 for b in range(m)] for a in range(m)]
        self.inner = [[scale[a] * scale[b] * rows[a][b] for b in range(m)] for a in range(m)]

    def run(self) -> Resolution:
        proj_iters, min_cosine_sim = 0, 1.0
        for iteration in range(self.settings.max_iters):
            found = self.lowest_pair()
            if found is None:
                break
            cosine, (i, j) = found
            if iteration == 0:
                min_cosine_sim = cosine
            proj_iters = iteration + 1
            self.resolve(i, j, cosine)

        window = self.settings.dominance_window
        for offset, winner in enumerate(self.winners):
            self.ring[(self.count - len(self.winners) + offset) % window] = winner
        return Resolution(
            coefficients=torch.tensor(self.coefficients, dtype=torch.float64),
            history=torch.tensor(self.ring, dtype=torch.int64),
            history_count=torch.tensor(self.count, dtype=torch.int64),
            proj_iters=torch.tensor(float(proj_iters), dtype=torch.float64),
            min_cosine_sim=torch.tensor(min_cosine_sim, dtype=torch.float64),
        )

    def lowest_pair(self) -> tuple[float, tuple[int, int]] | None:
        """The first pair with the strictly smallest cosine below the weak threshold, if any."""

        inner, eps = self.inner, self.settings.eps
        lowest, pair = self.settings.conflict_thresholds[2], None
        for i in range(len(inner)):
            for j in range(i + 1, len(inner)):
                if inner[i][i] < eps or inner[j][j] < eps:
                    continue
                cosine = inner[i][j] / (math.sqrt(inner[i][i] * inner[j][j]) + eps)
                if cosine < lowest:
                    lowest, pair = cosine, (i, j)
        return None if pair is None else (lowest, pair)

    def resolve(self, i: int, j: int, cosine: float) -> None:
        inner, eps = self.inner, self.settings.eps
        critical, main, _ = self.settings.conflict_thresholds
        if self.settings.use_smooth_logic:
            winner, loser = self.arbitrate(i, j)
            angle = _effective_angle(cosine, self.settings)
            dot = inner[i][j]
            step_winner = -math.sin(angle) * dot / (inner[loser][loser] + eps)
            step_loser = -math.sin(min(angle, _HALF_PI)) * dot / (inner[winner][winner] + eps)
            self.mix(winner, loser, (1.0, step_winner, step_loser, 1.0))
        elif cosine < critical:
            winner, loser = self.arbitrate(i, j)
            self.mix(winner, loser, (1.0, 0.0, 0.0, 0.0))
        elif cosine < main:
            winner, loser = self.arbitrate(i, j)
            step = -inner[loser][winner] / (inner[winner][winner] + eps)
            self.mix(winner, loser, (1.0, 0.0, step, 1.0))
        else:
            dot_product = cosine * math.sqrt(inner[i][i] * inner[j][j])
            step_i = -dot_product / (inner[j][j] + eps)
            step_j = -dot_product / (inner[i][i] + eps)
            self.mix(i, j, (1.0, step_i, step_j, 1.0))

    def arbitrate(self, i: int, j: int) -> tuple[int, int]:
        """The reference's ``_run_arbitrator``: (winner, loser), the winner entering the history."""

        window, eps = self.settings.dominance_window, self.settings.eps
        stability_weight, strength_weight = self.settings.tie_breaking_weights
        winner, loser = i, j
        if window and len(self.winners) == window and all(w == i for w in self.winners):
            winner, loser = j, i
        elif window and len(self.winners) == window and all(w == j for w in self.winners):
            pass
        else:
            stabilities, scaled_norms = [], []
            for k in (i, j):
                norm = math.sqrt(max(self.inner[k][k], 0.0))
                dot_previous = sum(c * self.cross[t][k] for t, c in enumerate(self.coefficients[k]))
                stabilities.append(max(dot_previous / (norm * self.previous_norms[k] + eps), 0.0))
                scaled_norms.append(norm / (self.norm_ema[k] + eps))
            total = scaled_norms[0] + scaled_norms[1]
            score_i, score_j = (
                stability_weight * stability + strength_weight * scaled / (total + eps)
                for stability, scaled in zip(stabilities, scaled_norms, strict=True)
            )
            if score_j > score_i:
                winner, loser = j, i
        if window:
            self.winners = [*self.winners, winner][-window:]
            self.count += 1
        return winner, loser

    def mix(self, first: int, second: int, mixing: tuple[float, float, float, float]) -> None:
        r"""
        Replaces rows ``first`` and ``second`` by ``[[p, q], [r, s]]`` times the pair (both from
        the old rows), keeping the inner products :math:`D = C G C^\top` as :math:`M D M^\top`.
        """

        p, q, r, s = mixing
        for matrix in (self.coefficients, self.inner):
            old_first, old_second = matrix[first], matrix[second]
            matrix[first] = [p * a + q * b for a, b in zip(old_first, old_second, strict=True)]
            matrix[second] = [r * a + s * b for a, b in zip(old_first, old_second, strict=True)]
        for row in self.inner:
            a, b = row[first], row[second]
            row[first], row[second] = p * a + q * b, r * a + s * b


class _DeviceResolver:
    """
    The resolution loop as tensor operations: ``max_iters`` iterations, each inert once no pair
    is left, rows selected by one-hot vectors, so that nothing synchronises and it traces.
    """

    def __init__(
        self,
        gramian: Tensor,
        cross: Tensor,
        previous_norms_sq: Tensor,
        norm_ema: Tensor,
        history: Tensor,
        history_count: Tensor,
        settings: ResolveSettings,
    ) -> None:
        # The m x m solve runs in float64 (it costs nothing), like the Python floats of the host
        # path: the tiny cosines left by a projection are then resolved as the reference does in
        # float64, instead of drowning in float32 cancellation.
        dtype, device = torch.float64, gramian.device
        self.settings, self.dtype, self.device = settings, dtype, device
        self.gramian, self.cross = gramian.to(dtype), cross.to(dtype)
        self.previous_norms = previous_norms_sq.to(dtype).clamp(min=0.0).sqrt()
        self.norm_ema = norm_ema.to(dtype)
        self.history, self.history_count = history, history_count
        m = gramian.shape[0]
        self.indices = torch.arange(m, device=device)
        self.positions = torch.arange(settings.dominance_window, device=device)
        self.upper = torch.ones(m, m, dtype=torch.bool, device=device).triu(diagonal=1)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        scale = torch.ones(m, dtype=dtype, device=device)
        if settings.norm_cap is not None:
            norms = self.gramian.diagonal().clamp(min=0.0).sqrt()
            cap = settings.norm_cap
            scale = torch.where(norms > cap, cap / (norms + settings.eps), scale)
        self.coefficients = torch.diag(scale)

    def run(self) -> Resolution:
        active = torch.ones((), dtype=torch.bool, device=self.device)
        proj_iters, min_cosine_sim = self.zero, torch.ones_like(self.zero)
        for iteration in range(self.settings.max_iters):
            inner = self.coefficients @ self.gramian @ self.coefficients.T
            lowest, i, j = self.lowest_pair(inner)
            found = active & (lowest < self.settings.conflict_thresholds[2])
            if iteration == 0:
                min_cosine_sim = torch.where(found, lowest, min_cosine_sim)
            proj_iters = proj_iters + found.to(self.dtype)
            active = found
            self.resolve(inner, lowest, i, j, found)
        return Resolution(
            self.coefficients, self.history, self.history_count, proj_iters, min_cosine_sim
        )

    def lowest_pair(self, inner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        eps, m = self.settings.eps, inner.shape[0]
        squares = inner.diagonal()
        usable = (squares >= eps).unsqueeze(0) & (squares >= eps).unsqueeze(1) & self.upper
        cosines = inner / ((squares.unsqueeze(1) * squares.unsqueeze(0)).sqrt() + eps)
        lowest, flat = torch.where(usable, cosines, torch.inf).flatten().min(dim=0)
        return lowest, flat // m, flat % m

    def resolve(self, inner: Tensor, cosine: Tensor, i: Tensor, j: Tensor, found: Tensor) -> None:
        settings, eps, zero = self.settings, self.settings.eps, self.zero
        critical, main, _ = settings.conflict_thresholds
        row_i, row_j = (self.indices == i).to(self.dtype), (self.indices == j).to(self.dtype)
        square_i, square_j = row_i @ inner @ row_i, row_j @ inner @ row_j
        dot = row_i @ inner @ row_j
        j_wins = self.j_wins(i, j, row_i, row_j, square_i, square_j)
        square_winner = torch.where(j_wins, square_j, square_i)
        square_loser = torch.where(j_wins, square_i, square_j)

        if settings.use_smooth_logic:
            angle = _effective_angle_tensor(cosine, settings)
            on_winner = -torch.sin(angle) * dot / (square_loser + eps)
            on_loser = -torch.sin(angle.clamp(max=_HALF_PI)) * dot / (square_winner + eps)
            mixing = (zero, on_winner, on_loser, zero)
            arbitrated = torch.ones((), dtype=torch.bool, device=self.device)
        else:
            is_critical, arbitrated = cosine < critical, cosine < main
            projection = -dot / (square_winner + eps)
            dot_product = cosine * (square_i * square_j).sqrt()
            # The legacy weak zone projects both rows, without arbitration, in the order (i, j).
            on_i, on_j = -dot_product / (square_j + eps), -dot_product / (square_i + eps)
            mixing = (
                zero,
                torch.where(arbitrated, zero, on_i),
                torch.where(is_critical, zero, torch.where(arbitrated, projection, on_j)),
                torch.where(is_critical, -1.0, zero),
            )
        winner_is_j = arbitrated & j_wins
        self.mix(
            torch.where(winner_is_j, row_j, row_i),
            torch.where(winner_is_j, row_i, row_j),
            mixing,
            found,
        )
        window = settings.dominance_window
        if window:
            appends = found & arbitrated
            slot = self.positions == self.history_count % window
            self.history = torch.where(slot & appends, torch.where(j_wins, j, i), self.history)
            self.history_count = self.history_count + appends.to(self.history_count.dtype)

    def j_wins(
        self, i: Tensor, j: Tensor, row_i: Tensor, row_j: Tensor, square_i: Tensor, square_j: Tensor
    ) -> Tensor:
        """The arbitrator: whether row j beats row i (dominance first, then the scores)."""

        eps, window = self.settings.eps, self.settings.dominance_window
        stability_weight, strength_weight = self.settings.tie_breaking_weights
        previous_dots = (self.coefficients * self.cross.T).sum(dim=1)  # <r_k, p_k> for every k
        scores = []
        norms = [square_i.clamp(min=0.0).sqrt(), square_j.clamp(min=0.0).sqrt()]
        scaled = [
            norm / (row @ self.norm_ema + eps)
            for norm, row in zip(norms, (row_i, row_j), strict=True)
        ]
        for norm, row, scaled_norm in zip(norms, (row_i, row_j), scaled, strict=True):
            stability = (row @ previous_dots) / (norm * (row @ self.previous_norms) + eps)
            strength = scaled_norm / (scaled[0] + scaled[1] + eps)
            scores.append(stability_weight * stability.clamp(min=0.0) + strength_weight * strength)
        j_wins = scores[1] > scores[0]
        if window:
            full = self.history_count >= window
            i_dominant, j_dominant = (
                full & (self.history == i).all(),
                full & (self.history == j).all(),
            )
            j_wins = i_dominant | (~j_dominant & j_wins)
        return j_wins

    def mix(self, first: Tensor, second: Tensor, mixing: tuple[Tensor, ...], found: Tensor) -> None:
        """Adds ``a r_f + b r_s`` to row ``first`` and ``c r_f + d r_s`` to row ``second``."""

        a, b, c, d = mixing
        first_row, second_row = first @ self.coefficients, second @ self.coefficients
        updated = (
            self.coefficients
            + first.unsqueeze(1) * (a * first_row + b * second_row)
            + second.unsqueeze(1) * (c * first_row + d * second_row)
        )
        self.coefficients = torch.where(found, updated, self.coefficients)


def _effective_angle_tensor(cosine: Tensor, settings: ResolveSettings) -> Tensor:
    critical, main, weak = settings.conflict_thresholds
    c = cosine.clamp(-1.0, 1.0)
    above_main = _HALF_PI * (1.0 - ((c - main) / (weak - main + settings.eps)).clamp(0.0, 1.0))
    between = (
        _HALF_PI
        + _HALF_PI * ((c - main) / (critical - main + settings.eps)) ** settings.remap_power
    )
    return torch.where(c >= main, above_main, torch.where(c > critical, between, math.pi))


def gramian_and_cross_products(
    matrix: Tensor, jacobians: Tensor, previous_half: Tensor
) -> tuple[Tensor, Tensor]:
    r"""
    Returns :math:`G = J J^\top` and :math:`Y = J J_{prev}^\top`, and copies :math:`J` into
    the half of ``jacobians`` (shape ``[2m, n]``) that does not hold :math:`J_{prev}`;
    ``previous_half`` (0 or 1, a tensor) tells which half does.

    Both products come from :math:`J\,[H_0; H_1]^\top`, computed over chunks of columns: each
    chunk of :math:`J` is read once, copied and multiplied while in cache, so the pass streams
    :math:`J` once. The rows to write are chosen by tensor indexing: nothing synchronises with
    the host, and the caller keeps :math:`J_{prev}` for a non-finite step by not flipping
    ``previous_half``.
    """

    m, n = matrix.shape
    dtype = accumulation_dtype(matrix.dtype)
    rows = torch.arange(m, device=matrix.device)
    scratch_rows = torch.where(previous_half == 0, rows + m, rows)
    products = torch.zeros(m, 2 * m, dtype=dtype, device=matrix.device)
    width = max(1, _CHUNK_ELEMENTS // m)
    for start in range(0, n, width):
        block = matrix[:, start : start + width]
        halves = jacobians[:, start : start + width]
        halves.index_copy_(0, scratch_rows, block)
        products.addmm_(block.to(dtype), halves.to(dtype).T)
    first, second = products[:, :m], products[:, m:]
    gramian = torch.where(previous_half == 0, second, first)
    cross = torch.where(previous_half == 0, first, second)
    return gramian, cross


class _GCondParameters:
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

    def _parameters_repr(self) -> str:
        return (
            f"conflict_thresholds={self.conflict_thresholds!r}, "
            f"use_smooth_logic={self.use_smooth_logic!r}, remap_power={self.remap_power!r}, "
            f"dominance_window={self.dominance_window!r}, "
            f"tie_breaking_weights={self.tie_breaking_weights!r}, "
            f"norm_ema_beta={self.norm_ema_beta!r}, norm_cap={self.norm_cap!r}, "
            f"projection_max_iters={self.projection_max_iters!r}"
        )


class GCondWeighting(_GCondParameters, MatrixWeightingBase, LazyState, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting`
    [:class:`~torchjd.linalg.Matrix`] of GCond, the Gradient Conductor of `GCond: Gradient
    Conflict Resolution via Accumulation-based Stabilization for Large-Scale Multi-Task Learning
    <https://arxiv.org/abs/2509.07252>`_: weights :math:`w` such that :math:`w^\top J` is the
    resolved gradient of the official implementation (its ``_project``).

    The rows of :math:`J` are the tasks' gradients, accumulated over several micro-batches by
    torchjd (see :class:`GCond`). Each call:

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
    cosine of the last call are :attr:`proj_iters` and :attr:`min_cosine_sim`, for monitoring.
    """

    _state_names = (
        "jacobians",
        "previous_half",
        "previous_coefficients",
        "previous_norms_sq",
        "norm_ema",
        "winner_history",
        "winner_count",
        "step_count",
    )
    jacobians: Tensor
    previous_half: Tensor
    previous_coefficients: Tensor
    previous_norms_sq: Tensor
    norm_ema: Tensor
    winner_history: Tensor
    winner_count: Tensor
    step_count: Tensor
    proj_iters: Tensor | None
    min_cosine_sim: Tensor | None

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
        self.conflict_thresholds = conflict_thresholds
        self.use_smooth_logic = use_smooth_logic
        self.remap_power = remap_power
        self.dominance_window = dominance_window
        self.tie_breaking_weights = tie_breaking_weights
        self.norm_ema_beta = norm_ema_beta
        self.norm_cap = norm_cap
        self.projection_max_iters = projection_max_iters
        self.eps = eps
        self._register_state()
        self.register_buffer("proj_iters", None, persistent=False)
        self.register_buffer("min_cosine_sim", None, persistent=False)

    def _state_sizes(self, count: int) -> tuple[int, ...]:
        rows, n = self.jacobians.shape
        return (rows // 2, n)[:count]

    # A checkpoint holds the previous Jacobian only: the other half of ``jacobians`` is scratch
    # space (the Jacobian of the step being computed, or of a rejected non-finite step).

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        jacobians = destination.pop(prefix + "jacobians")
        half = destination.pop(prefix + "previous_half")
        m = jacobians.shape[0] // 2
        start = m * int(half) if jacobians.numel() else 0  # a host read, in checkpointing only
        destination[prefix + "previous_jacobian"] = jacobians[start : start + m]

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state = dict(state_dict)
        previous = state.pop(prefix + "previous_jacobian", None)
        if isinstance(previous, Tensor):
            # The half an uninterrupted run would hold it in (each finite step flips it, from 0):
            # the products come out of other columns of one matmul otherwise, which can round
            # differently, and the resumed run would not be bit-identical.
            steps = state.get(prefix + "step_count")
            half = int(steps) % 2 if isinstance(steps, Tensor) and steps.numel() == 1 else 0
            scratch = torch.zeros_like(previous)
            halves = [scratch, previous] if half else [previous, scratch]
            state[prefix + "jacobians"] = torch.cat(halves)
            state[prefix + "previous_half"] = torch.tensor(half, dtype=torch.int64)
        super()._load_from_state_dict(
            state, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        m, n = sizes
        device, dtype = like.device, accumulation_dtype(like.dtype)

        def counter() -> Tensor:
            return torch.zeros((), dtype=torch.int64, device=device)

        return {
            "jacobians": torch.zeros(2 * m, n, dtype=like.dtype, device=device),
            "previous_half": counter(),
            "previous_coefficients": torch.eye(m, dtype=dtype, device=device),
            "previous_norms_sq": torch.zeros(m, dtype=dtype, device=device),
            "norm_ema": torch.ones(m, dtype=torch.float64, device=device),
            "winner_history": torch.full((self.dominance_window,), -1, device=device),
            "winner_count": counter(),
            "step_count": counter(),
        }

    def forward(self, matrix: Matrix, /) -> Tensor:
        check_input(matrix, self, gramian=False)
        m, n = matrix.shape
        self._ensure_state((m, n), matrix)
        if self.winner_history.numel() != self.dominance_window:  # the window was changed
            self.winner_history = torch.full((self.dominance_window,), -1, device=matrix.device)
            self.winner_count = torch.zeros_like(self.winner_count)

        gramian, cross = gramian_and_cross_products(
            matrix.detach(), self.jacobians, self.previous_half
        )
        finite = all_finite(gramian)
        cross = cross @ self.previous_coefficients.T  # J P^T with P = C_prev J_prev
        norm_ema = self.norm_ema
        if m > 1:
            norms = gramian.diagonal().clamp(min=0.0).sqrt().to(torch.float64)
            beta = self.norm_ema_beta
            norm_ema = (beta * norm_ema + (1.0 - beta) * norms).clamp(min=self.eps)
            resolution = resolve_conflicts(
                gramian,
                cross,
                self.previous_norms_sq,
                norm_ema,
                self.winner_history,
                self.winner_count,
                self._settings(m),
            )
        else:  # the reference returns a single task's gradient untouched
            resolution = Resolution(
                torch.ones(1, 1, dtype=gramian.dtype, device=gramian.device),
                self.winner_history,
                self.winner_count,
                torch.zeros((), dtype=gramian.dtype, device=gramian.device),
                torch.ones((), dtype=gramian.dtype, device=gramian.device),
            )

        coefficients = resolution.coefficients.to(device=gramian.device, dtype=gramian.dtype)
        self._commit(
            finite,
            previous_half=1 - self.previous_half,
            previous_coefficients=coefficients,
            previous_norms_sq=((coefficients @ gramian) * coefficients).sum(dim=1),
            norm_ema=norm_ema,
            winner_history=resolution.history.to(gramian.device),
            winner_count=resolution.history_count.to(gramian.device),
            step_count=self.step_count + 1,
        )
        self.proj_iters = resolution.proj_iters
        self.min_cosine_sim = resolution.min_cosine_sim
        return nan_unless(finite, coefficients.sum(dim=0)).to(matrix.dtype)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self._parameters_repr()}, eps={self.eps!r})"


class GCond(_GCondParameters, MatrixAggregator, LazyState, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.WeightedAggregator` of GCond, the
    Gradient Conductor of `GCond: Gradient Conflict Resolution via Accumulation-based
    Stabilization for Large-Scale Multi-Task Learning <https://arxiv.org/abs/2509.07252>`_
    (official implementation: `AlevLab-dev/GCond <https://github.com/AlevLab-dev/GCond>`_).

    It resolves the conflicts between the tasks' accumulated gradients with
    :class:`GCondWeighting` and returns the bias-corrected momentum of the resolved gradient
    :math:`g_t = w^\top J`, as the reference writes into ``.grad``:

    .. math::

        m_t = \beta m_{t-1} + (1 - \beta) g_t, \qquad \text{update} = m_t / (1 - \beta^t)

    With ``momentum_beta=0`` the update is :math:`g_t` itself and no momentum is stored.

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

    **Optimizers, Lion and trust ratio.** GCond's update already carries the momentum, so the
    optimizer should not add another first moment: the reference's README uses
    ``AdamW(..., betas=(0.0, 0.95))``. Its optional ``use_lion`` update, the sign of the
    bias-corrected momentum scaled per parameter by a LARS trust ratio
    ``trust_ratio_coef * min(||p|| / ||m||, trust_ratio_clip)``, is an optimizer's job too: any
    sign-based optimizer without first moment on GCond's output reproduces it (the docs show one
    in ten lines).

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
    _state_names = ("momentum", "step_count")
    momentum: Tensor
    step_count: Tensor

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
        super().__init__(
            GCondWeighting(
                conflict_thresholds,
                use_smooth_logic,
                remap_power,
                dominance_window,
                tie_breaking_weights,
                norm_ema_beta,
                norm_cap,
                projection_max_iters,
                eps,
            )
        )
        self.momentum_beta = momentum_beta
        self._register_state()

    conflict_thresholds = forwarded("conflict_thresholds")
    use_smooth_logic = forwarded("use_smooth_logic")
    remap_power = forwarded("remap_power")
    dominance_window = forwarded("dominance_window")
    tie_breaking_weights = forwarded("tie_breaking_weights")
    norm_ema_beta = forwarded("norm_ema_beta")
    norm_cap = forwarded("norm_cap")
    projection_max_iters = forwarded("projection_max_iters")
    eps = forwarded("eps")

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

    def forward(self, matrix: Matrix, /) -> Tensor:
        weighting_resets = self.weighting._has_state and self.weighting._state_sizes(2) != tuple(
            matrix.shape
        )
        weights = self.weighting(matrix)  # warns if the sizes changed
        beta = self.momentum_beta
        if beta == 0.0:
            return combine_rows(weights, matrix)

        if weighting_resets:  # the momentum restarts with the weighting
            LazyState.reset(self)
        self._ensure_state((matrix.shape[1],), matrix)
        finite = all_finite(weights)
        dtype = self.momentum.dtype
        if matrix.dtype == dtype:  # one pass over J for the product and the average
            momentum = torch.addmv(
                self.momentum, matrix.T, weights.to(dtype), beta=beta, alpha=1.0 - beta
            )
        else:
            resolved = combine_rows(weights, matrix, dtype=dtype)
            momentum = torch.add(beta * self.momentum, resolved, alpha=1.0 - beta)
        step = self.step_count + 1
        self._commit(finite, momentum=momentum, step_count=step)
        bias_correction = 1.0 - torch.pow(beta, step.to(torch.float64))
        return (momentum / bias_correction.to(dtype)).to(matrix.dtype)

    def reset(self) -> None:
        """Forgets the momentum and the weighting's state."""
        super().reset()
        self.weighting.reset()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self._parameters_repr()}, "
            f"momentum_beta={self.momentum_beta!r}, eps={self.eps!r})"
        )
