"""GCond's statistics of its last call, as the official ``GradientConductor`` reports them."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._kernels.gcond import ZONES


@dataclass(frozen=True)
class GCondStatistics:
    """
    The statistics of GCond's last call, as tensors on the device of its input: nothing is read
    on the host until :meth:`as_dict` is called, so they can be taken at every step.

    :ivar step: The number of finite calls so far.
    :ivar proj_iters: How many resolution iterations resolved a pair.
    :ivar min_cosine_sim: The smallest cosine between two rows, if below the weak threshold (the
        first pair resolved), else 1.
    :ivar zone: The zone of the last pair resolved (0 none, 1 weak, 2 main, 3 critical).
    :ivar winner: The task the arbitrator last named (an index into :attr:`names`), -1 if none.
    :ivar raw_norms: The norm of each task's accumulated gradient, in the call's order.
    :ivar norm_ema: Each task's norm average after the call, in the call's order.
    :ivar final_grad_norm: The norm of the update the aggregator returned (``None`` from the
        weighting, which returns no update).
    :ivar tasks: The names of the call's rows (``task_0``, ... without names).
    :ivar names: The names the winner indexes: the known tasks, or the call's.
    """

    step: Tensor
    proj_iters: Tensor
    min_cosine_sim: Tensor
    zone: Tensor
    winner: Tensor
    raw_norms: Tensor
    norm_ema: Tensor
    final_grad_norm: Tensor | None
    tasks: tuple[Hashable, ...]
    names: tuple[Hashable, ...]

    def as_dict(self) -> dict[str, Any]:
        """
        The statistics as Python numbers and names, with the official keys (``proj_iters``,
        ``min_cosine_sim``, ``raw_norm/{task}``, ``norm_ema/{task}``, ``final_grad_norm``,
        ``step``) plus ``zone`` and ``winner``. Reads them on the host.
        """

        winner = int(self.winner)
        report: dict[str, Any] = {
            "step": int(self.step),
            "proj_iters": float(self.proj_iters),
            "min_cosine_sim": float(self.min_cosine_sim),
            "zone": ZONES[int(self.zone)],
            "winner": self.names[winner] if winner >= 0 else None,
        }
        for name, norm, average in zip(
            self.tasks, self.raw_norms.tolist(), self.norm_ema.tolist(), strict=True
        ):
            report[f"raw_norm/{name}"] = norm
            report[f"norm_ema/{name}"] = average
        if self.final_grad_norm is not None:
            report["final_grad_norm"] = float(self.final_grad_norm)
        return report
