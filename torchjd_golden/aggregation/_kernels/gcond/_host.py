r"""
GCond's resolution on the host path: Python floats and NumPy on the :math:`m \times m` matrices
of a CPU tensor, :math:`O(m)` vector work per iteration (see :mod:`.` for the convention).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from .._paths import host_array
from ._settings import HALF_PI, Resolution, ResolveSettings


def _effective_angle(cosine: float, settings: ResolveSettings) -> float:
    """The reference's ``_get_effective_alpha``: the conflict angle remapped by the zones."""

    critical, main, weak = settings.conflict_thresholds
    c = min(max(cosine, -1.0), 1.0)
    if c >= main:
        t = min(max((c - main) / (weak - main + settings.eps), 0.0), 1.0)
        return HALF_PI * (1.0 - t)
    if c > critical:
        t = (c - main) / (critical - main + settings.eps)
        return HALF_PI + HALF_PI * math.pow(t, settings.remap_power)
    return math.pi


def _zone(cosine: float, settings: ResolveSettings) -> int:
    """The zone of a resolved pair (1 weak, 2 main, 3 critical), as each logic branches."""

    critical, main, _ = settings.conflict_thresholds
    if settings.use_smooth_logic:
        return 1 if cosine >= main else 2 if cosine > critical else 3
    return 3 if cosine < critical else 2 if cosine < main else 1


class HostResolution:
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
            on_loser = -math.sin(min(angle, HALF_PI)) * dot / (inner[first, first] + eps)
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
