r"""
GCond's conflict resolution (the official ``_project`` loop) in coefficient space.

The rows being resolved are :math:`R = C J` and their inner products :math:`D = C G C^\top`.
An iteration finds the pair with the smallest cosine, lets the arbitrator name a winner, and
replaces the pair's rows by a :math:`2 \times 2` mix of the old ones, :math:`(r_f, r_s)
\leftarrow M (r_f, r_s)`: :math:`C_{fs} \leftarrow M C_{fs}`, then the rows :math:`D_{fs}
\leftarrow M D_{fs}` and the columns :math:`D_{:,fs} \leftarrow D_{:,fs} M^\top`. Both paths use
this one convention, with :math:`M` from :func:`_mixing` (host) or its tensor twin.

The host path keeps :math:`C` and :math:`D` side by side (one row operation mixes both), keeps
:math:`D` exactly symmetric (its columns copied from its rows, the pair's block mixed on both
sides), and keeps a symmetric cosine matrix up to date: a mix changes two of its rows and
columns, so an iteration is :math:`O(m)` vector work and one ``argmin`` (whose first minimum in
row-major order is the reference's first pair in scan order). The tensor path
recomputes the :math:`m \times m` cosines at each of its ``max_iters`` iterations (each inert
once no pair is left), with no host synchronisation. A NaN stops both loops (its step is
discarded by the caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from .._paths import SolverPath, chosen_path, host_array, solver_dtype

_HALF_PI = math.pi / 2.0


@dataclass(frozen=True)
class ResolveSettings:
    """The hyper-parameters of the resolution, as the reference names them."""

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
    """The outcome of one resolution: the resolved rows are ``coefficients @ J``."""

    coefficients: Tensor
    history: Tensor
    history_count: Tensor
    proj_iters: Tensor
    min_cosine_sim: Tensor
    last_zone: Tensor  # of the last resolved pair: 0 none, 1 weak, 2 main, 3 critical
    last_winner: Tensor  # the task id the arbitrator last named, -1 if none


ZONES = ("none", "weak", "main", "critical")
"""The names of the zones, by the numbers of :attr:`Resolution.last_zone`."""


def resolve_conflicts(
    gramian: Tensor,
    cross: Tensor,
    previous_norms_sq: Tensor,
    norm_ema: Tensor,
    history: Tensor,
    history_count: Tensor,
    settings: ResolveSettings,
    *,
    task_ids: Tensor | None = None,
    path: SolverPath | None = None,
) -> Resolution:
    r"""
    Runs the reference's ``_project`` loop in coefficient space.

    :param gramian: :math:`G = J J^\top`, the inner products of this step's rows.
    :param cross: :math:`X = J P^\top`, with :math:`P` the previous step's resolved rows, for
        the stability score :math:`\langle r_k, p_k \rangle = (C X)_{kk}`.
    :param previous_norms_sq: :math:`\|p_k\|^2`.
    :param norm_ema: The per-task norm averages, already updated with this step's norms.
    :param history: The winner history as a ring buffer: the :math:`k`-th winner ever appended
        is at position :math:`k` mod ``dominance_window``.
    :param history_count: How many winners were ever appended.
    :param settings: The hyper-parameters.
    :param task_ids: The identity of each row in the history (the winners are stored and compared
        as these), shape ``[m]``; by default the row indices.
    :param path: ``"host"``, ``"tensor"`` or ``"auto"``; ``None`` follows
        :func:`~._paths.solver_path`.
    :returns: The coefficients :math:`C` (float64, or the tensor path's dtype), the history and
        its count, the number of iterations that resolved a pair and the first iteration's cosine.
    """

    if task_ids is None:
        task_ids = torch.arange(gramian.shape[0], device=gramian.device)
    inputs = (
        gramian,
        cross,
        previous_norms_sq,
        norm_ema,
        history,
        history_count,
        task_ids,
        settings,
    )
    if chosen_path(gramian, path) == "host":
        with np.errstate(all="ignore"):  # a non-finite step runs too; its output is discarded
            return _HostResolution(*inputs).run()
    return _TensorResolution(*inputs).run()


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


def _zone(cosine: float, settings: ResolveSettings) -> int:
    """The zone of a resolved pair (1 weak, 2 main, 3 critical), as each logic branches."""

    critical, main, _ = settings.conflict_thresholds
    if settings.use_smooth_logic:
        return 1 if cosine >= main else 2 if cosine > critical else 3
    return 3 if cosine < critical else 2 if cosine < main else 1


def _zone_tensor(cosine: Tensor, settings: ResolveSettings) -> Tensor:
    critical, main, _ = settings.conflict_thresholds
    if settings.use_smooth_logic:
        return torch.where(cosine >= main, 1, torch.where(cosine > critical, 2, 3))
    return torch.where(cosine < critical, 3, torch.where(cosine < main, 2, 1))


def _effective_angle_tensor(cosine: Tensor, settings: ResolveSettings) -> Tensor:
    critical, main, weak = settings.conflict_thresholds
    c = cosine.clamp(-1.0, 1.0)
    above_main = _HALF_PI * (1.0 - ((c - main) / (weak - main + settings.eps)).clamp(0.0, 1.0))
    between = (
        _HALF_PI
        + _HALF_PI * ((c - main) / (critical - main + settings.eps)) ** settings.remap_power
    )
    return torch.where(c >= main, above_main, torch.where(c > critical, between, math.pi))


class _HostResolution:
    """The loop on NumPy float64 arrays; scalars (scores, angles) are Python floats."""

    def __init__(
        self,
        gramian: Tensor,
        cross: Tensor,
        previous_norms_sq: Tensor,
        norm_ema: Tensor,
        history: Tensor,
        history_count: Tensor,
        task_ids: Tensor,
        settings: ResolveSettings,
    ) -> None:
        self.settings = settings
        self.task_ids: list[int] = task_ids.tolist()
        self.last_zone, self.last_winner = 0, -1
        inner = host_array(gramian)
        m = inner.shape[0]
        scale = np.ones(m)
        if settings.norm_cap is not None:
            norms = np.sqrt(np.maximum(inner.diagonal(), 0.0))
            capped = norms > settings.norm_cap
            scale[capped] = settings.norm_cap / (norms[capped] + settings.eps)
        # The rows of C and of D side by side, so that a mix of two rows is one row operation.
        # D is kept exactly symmetric (its columns are copied from its rows), from its upper
        # triangle, the products the reference forms (i < j).
        inner = inner * np.outer(scale, scale)
        inner = np.triu(inner) + np.triu(inner, 1).T
        self.rows = np.hstack([np.diag(scale), inner])
        self.coefficients, self.inner = self.rows[:, :m], self.rows[:, m:]
        self.cross_columns = host_array(cross).T.copy()  # row k: the column of X for task k
        self.previous_norms = np.sqrt(np.maximum(host_array(previous_norms_sq), 0.0))
        self.norm_ema = host_array(norm_ema)
        self.ring: list[int] = history.tolist()
        self.count = int(history_count)
        window = settings.dominance_window
        first = max(0, self.count - window)
        self.winners = [self.ring[k % window] for k in range(first, self.count)] if window else []

        # The cosine of each usable pair, symmetric, inf on the diagonal and for a row with
        # |r|^2 < eps (it is "blocked": never paired), kept up to date by _mix. Its first
        # minimum in row-major order is the reference's first pair i < j with the smallest
        # cosine: the twin (j, i) of a pair comes after every pair (a, b) with a <= i.
        squares = self.inner.diagonal()
        self.blocked = np.where(squares >= settings.eps, 0.0, np.inf)
        self.cosines = self._cosines_with(np.arange(m))
        np.fill_diagonal(self.cosines, np.inf)

    def run(self) -> Resolution:
        proj_iters, min_cosine_sim = 0, 1.0
        weak = self.settings.conflict_thresholds[2]
        for iteration in range(self.settings.max_iters):
            # The first pair in scan order with the smallest cosine, as the reference's loop.
            i, j = divmod(int(self.cosines.argmin()), self.cosines.shape[0])
            cosine = float(self.cosines[i, j])
            if not cosine < weak:
                break
            if iteration == 0:
                min_cosine_sim = cosine
            proj_iters = iteration + 1
            self._resolve(i, j, cosine)

        window = self.settings.dominance_window
        for offset, winner in enumerate(self.winners):
            self.ring[(self.count - len(self.winners) + offset) % window] = winner
        return Resolution(
            coefficients=torch.from_numpy(np.ascontiguousarray(self.coefficients)),
            history=torch.tensor(self.ring, dtype=torch.int64),
            history_count=torch.tensor(self.count, dtype=torch.int64),
            proj_iters=torch.tensor(float(proj_iters), dtype=torch.float64),
            min_cosine_sim=torch.tensor(min_cosine_sim, dtype=torch.float64),
            last_zone=torch.tensor(self.last_zone, dtype=torch.int64),
            last_winner=torch.tensor(self.last_winner, dtype=torch.int64),
        )

    def _resolve(self, i: int, j: int, cosine: float) -> None:
        settings, inner, eps = self.settings, self.inner, self.settings.eps
        critical, main, _ = settings.conflict_thresholds
        first, second = i, j
        self.last_zone, self.last_winner = _zone(cosine, settings), -1
        if settings.use_smooth_logic:
            first, second = self._arbitrate(i, j)
            angle = _effective_angle(cosine, settings)
            dot = inner[i, j]
            on_winner = -math.sin(angle) * dot / (inner[second, second] + eps)
            on_loser = -math.sin(min(angle, _HALF_PI)) * dot / (inner[first, first] + eps)
            mixing = (1.0, on_winner, on_loser, 1.0)
        elif cosine < critical:
            first, second = self._arbitrate(i, j)
            mixing = (1.0, 0.0, 0.0, 0.0)  # the loser is zeroed
        elif cosine < main:
            first, second = self._arbitrate(i, j)
            projection = -inner[second, first] / (inner[first, first] + eps)
            mixing = (1.0, 0.0, projection, 1.0)  # the loser is projected off the winner
        else:  # weak zone: both rows projected off each other, without arbitration
            dot_product = cosine * math.sqrt(inner[i, i] * inner[j, j])
            on_i = -dot_product / (inner[j, j] + eps)
            on_j = -dot_product / (inner[i, i] + eps)
            mixing = (1.0, on_i, on_j, 1.0)
        self._mix(first, second, mixing)

    def _arbitrate(self, i: int, j: int) -> tuple[int, int]:
        """The reference's ``_run_arbitrator``: (winner, loser), the winner entering the history."""

        window, eps = self.settings.dominance_window, self.settings.eps
        stability_weight, strength_weight = self.settings.tie_breaking_weights
        winner, loser = i, j
        full = window > 0 and len(self.winners) == window
        id_i, id_j = self.task_ids[i], self.task_ids[j]
        if full and self.winners.count(id_i) == window:
            winner, loser = j, i
        elif not (full and self.winners.count(id_j) == window):
            norms = [math.sqrt(max(float(self.inner[k, k]), 0.0)) for k in (i, j)]
            scaled = [norms[0] / (self.norm_ema[i] + eps), norms[1] / (self.norm_ema[j] + eps)]
            total = scaled[0] + scaled[1]
            scores = []
            for norm, k, scaled_norm in zip(norms, (i, j), scaled, strict=True):
                previous_dot = float(self.coefficients[k] @ self.cross_columns[k])
                stability = previous_dot / (norm * float(self.previous_norms[k]) + eps)
                strength = scaled_norm / (total + eps)
                scores.append(stability_weight * max(stability, 0.0) + strength_weight * strength)
            if scores[1] > scores[0]:
                winner, loser = j, i
        self.last_winner = self.task_ids[winner]
        if window:
            self.winners = [*self.winners, self.task_ids[winner]][-window:]
            self.count += 1
        return winner, loser

    def _mix(self, first: int, second: int, mixing: tuple[float, float, float, float]) -> None:
        # The rows of C and D at once, then the columns of D: outside the pair's 2 x 2 block,
        # they are the new rows (D is symmetric); the block is mixed on both sides.
        _mix_rows(self.rows[first], self.rows[second], mixing)
        inner = self.inner
        p, q, r, s = mixing
        ff, fs, sf, ss = (
            inner[first, first],
            inner[first, second],
            inner[second, first],
            inner[second, second],
        )
        inner[:, first] = inner[first]
        inner[:, second] = inner[second]
        inner[first, first], inner[first, second] = p * ff + q * fs, r * ff + s * fs
        inner[second, first], inner[second, second] = p * sf + q * ss, r * sf + s * ss
        eps = self.settings.eps
        self.blocked[first] = 0.0 if inner[first, first] >= eps else np.inf
        self.blocked[second] = 0.0 if inner[second, second] >= eps else np.inf
        pair = np.array((first, second))
        cosines = self._cosines_with(pair)
        self.cosines[pair] = cosines
        self.cosines[:, pair] = cosines.T
        self.cosines[first, first] = self.cosines[second, second] = np.inf

    def _cosines_with(self, tasks: NDArray[np.intp]) -> NDArray[np.float64]:
        """
        The cosines of ``tasks`` with every row, inf where either row is blocked: entry (a, b)
        is <r_a, r_b> / (sqrt(|r_a|^2 |r_b|^2) + eps), the reference's formula (abs: a row
        rounded to a tiny negative |r|^2 is blocked, and must not give a NaN).
        """

        squares = self.inner.diagonal()
        products = np.abs(np.multiply.outer(squares[tasks], squares))
        cosines: NDArray[np.float64] = self.inner[tasks] / (np.sqrt(products) + self.settings.eps)
        cosines += self.blocked
        cosines += self.blocked[tasks, None]
        return cosines


def _mix_rows(
    first: NDArray[np.float64], second: NDArray[np.float64], mixing: tuple[float, ...]
) -> None:
    """``(first, second) <- (p first + q second, r first + s second)``, in place."""

    p, q, r, s = mixing
    old_first = first.copy() if r else None
    if p != 1.0:
        first *= p
    if q:
        first += q * second
    if s == 0.0:
        second.fill(0.0)
    elif s != 1.0:
        second *= s
    if old_first is not None:
        second += r * old_first


class _TensorResolution:
    """
    The loop as tensor operations: ``max_iters`` iterations, each inert once no pair is left, the
    pair's rows gathered and scattered by index tensors, so that nothing synchronises.
    """

    def __init__(
        self,
        gramian: Tensor,
        cross: Tensor,
        previous_norms_sq: Tensor,
        norm_ema: Tensor,
        history: Tensor,
        history_count: Tensor,
        task_ids: Tensor,
        settings: ResolveSettings,
    ) -> None:
        device = gramian.device
        self.task_ids = task_ids
        dtype = solver_dtype(device)
        self.settings, self.dtype, self.device = settings, dtype, device
        gramian = gramian.to(dtype)
        self.cross = cross.to(dtype)
        self.previous_norms = previous_norms_sq.to(dtype).clamp(min=0.0).sqrt()
        self.norm_ema = norm_ema.to(dtype)
        self.history, self.history_count = history, history_count
        m = gramian.shape[0]
        self.positions = torch.arange(settings.dominance_window, device=device)
        self.upper = torch.ones(m, m, dtype=torch.bool, device=device).triu(diagonal=1)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.one = torch.ones((), dtype=dtype, device=device)
        scale = torch.ones(m, dtype=dtype, device=device)
        if settings.norm_cap is not None:
            norms = gramian.diagonal().clamp(min=0.0).sqrt()
            cap = settings.norm_cap
            scale = torch.where(norms > cap, cap / (norms + settings.eps), scale)
        self.coefficients = torch.diag(scale)
        self.inner = gramian * scale.unsqueeze(1) * scale.unsqueeze(0)
        self.last_zone = torch.zeros((), dtype=torch.int64, device=device)
        self.last_winner = torch.full((), -1, dtype=torch.int64, device=device)

    def run(self) -> Resolution:
        active = torch.ones((), dtype=torch.bool, device=self.device)
        proj_iters, min_cosine_sim = self.zero, self.one
        for iteration in range(self.settings.max_iters):
            lowest, i, j = self._lowest_pair()
            found = active & (lowest < self.settings.conflict_thresholds[2])
            if iteration == 0:
                min_cosine_sim = torch.where(found, lowest, min_cosine_sim)
            proj_iters = proj_iters + found.to(self.dtype)
            active = found
            self._resolve(lowest, i, j, found)
        return Resolution(
            coefficients=self.coefficients,
            history=self.history,
            history_count=self.history_count,
            proj_iters=proj_iters,
            min_cosine_sim=min_cosine_sim,
            last_zone=self.last_zone,
            last_winner=self.last_winner,
        )

    def _lowest_pair(self) -> tuple[Tensor, Tensor, Tensor]:
        inner, eps, m = self.inner, self.settings.eps, self.inner.shape[0]
        squares = inner.diagonal()
        usable = (squares >= eps).unsqueeze(0) & (squares >= eps).unsqueeze(1) & self.upper
        cosines = inner / ((squares.unsqueeze(1) * squares.unsqueeze(0)).sqrt() + eps)
        lowest, flat = torch.where(usable, cosines, torch.inf).flatten().min(dim=0)
        return lowest, flat // m, flat % m

    def _resolve(self, cosine: Tensor, i: Tensor, j: Tensor, found: Tensor) -> None:
        settings, eps, zero, one = self.settings, self.settings.eps, self.zero, self.one
        critical, main, _ = settings.conflict_thresholds
        pair = torch.stack([i, j])
        block = self.inner.index_select(0, pair).index_select(1, pair)  # D restricted to (i, j)
        squares = block.diagonal()
        square_i, square_j, dot = squares[0], squares[1], block[0, 1]
        ids = self.task_ids.index_select(0, pair)
        j_wins = self._j_wins(pair, ids, squares)
        square_winner = torch.where(j_wins, square_j, square_i)
        square_loser = torch.where(j_wins, square_i, square_j)

        if settings.use_smooth_logic:
            angle = _effective_angle_tensor(cosine, settings)
            on_winner = -torch.sin(angle) * dot / (square_loser + eps)
            on_loser = -torch.sin(angle.clamp(max=_HALF_PI)) * dot / (square_winner + eps)
            mixing = [one, on_winner, on_loser, one]
            arbitrated = torch.ones((), dtype=torch.bool, device=self.device)
        else:
            is_critical, arbitrated = cosine < critical, cosine < main
            projection = -dot / (square_winner + eps)
            dot_product = cosine * (square_i * square_j).sqrt()
            # The weak zone projects both rows, without arbitration, in the order (i, j).
            on_i, on_j = -dot_product / (square_j + eps), -dot_product / (square_i + eps)
            mixing = [
                one,
                torch.where(arbitrated, zero, on_i),
                torch.where(is_critical, zero, torch.where(arbitrated, projection, on_j)),
                torch.where(is_critical, zero, one),
            ]
        identity = [one, zero, zero, one]
        matrix = torch.stack(
            [torch.where(found, a, b) for a, b in zip(mixing, identity, strict=True)]
        ).reshape(2, 2)
        winner_is_j = arbitrated & j_wins
        self._mix(torch.where(winner_is_j, pair.flip(0), pair), matrix)
        winner = torch.where(j_wins, ids[1], ids[0])
        self.last_zone = torch.where(found, _zone_tensor(cosine, settings), self.last_zone)
        named = torch.where(arbitrated, winner, -1)
        self.last_winner = torch.where(found, named, self.last_winner)
        window = settings.dominance_window
        if window:
            appends = found & arbitrated
            slot = self.positions == self.history_count % window
            self.history = torch.where(slot & appends, winner, self.history)
            self.history_count = self.history_count + appends.to(self.history_count.dtype)

    def _j_wins(self, pair: Tensor, ids: Tensor, squares: Tensor) -> Tensor:
        """
        The arbitrator: whether row j beats row i (dominance first, then the scores); ``ids``
        are the pair's task ids.
        """

        eps, window = self.settings.eps, self.settings.dominance_window
        stability_weight, strength_weight = self.settings.tie_breaking_weights
        norms = squares.clamp(min=0.0).sqrt()
        previous_dots = (
            self.coefficients.index_select(0, pair) * self.cross.index_select(1, pair).T
        ).sum(dim=1)
        stability = previous_dots / (norms * self.previous_norms.index_select(0, pair) + eps)
        scaled = norms / (self.norm_ema.index_select(0, pair) + eps)
        strength = scaled / (scaled.sum() + eps)
        scores = stability_weight * stability.clamp(min=0.0) + strength_weight * strength
        j_wins = scores[1] > scores[0]
        if window:
            full = self.history_count >= window
            i_dominant = full & (self.history == ids[0]).all()
            j_dominant = full & (self.history == ids[1]).all()
            j_wins = i_dominant | (~j_dominant & j_wins)
        return j_wins

    def _mix(self, pair: Tensor, matrix: Tensor) -> None:
        self.coefficients = self.coefficients.index_copy(
            0, pair, matrix @ self.coefficients.index_select(0, pair)
        )
        inner = self.inner.index_copy(0, pair, matrix @ self.inner.index_select(0, pair))
        self.inner = inner.index_copy(1, pair, inner.index_select(1, pair) @ matrix.T)
