r"""
GCond's resolution on the tensor path: every iteration on the device, no host synchronisation,
a fixed number of iterations (each inert once no pair is left), see :mod:`.` for the convention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._paths import solver_dtype
from ._settings import HALF_PI, Resolution, ResolveSettings


def _zone_tensor(cosine: Tensor, settings: ResolveSettings) -> Tensor:
    critical, main, _ = settings.conflict_thresholds
    if settings.use_smooth_logic:
        return torch.where(cosine >= main, 1, torch.where(cosine > critical, 2, 3))
    return torch.where(cosine < critical, 3, torch.where(cosine < main, 2, 1))


def _effective_angle_tensor(cosine: Tensor, settings: ResolveSettings) -> Tensor:
    critical, main, weak = settings.conflict_thresholds
    c = cosine.clamp(-1.0, 1.0)
    above_main = HALF_PI * (1.0 - ((c - main) / (weak - main + settings.eps)).clamp(0.0, 1.0))
    between = (
        HALF_PI + HALF_PI * ((c - main) / (critical - main + settings.eps)) ** settings.remap_power
    )
    return torch.where(c >= main, above_main, torch.where(c > critical, between, math.pi))


class TensorResolution:
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
            on_loser = -torch.sin(angle.clamp(max=HALF_PI)) * dot / (square_winner + eps)
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
