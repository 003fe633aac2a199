"""``golden_pendulum.callbacks``: the weight logger and the Lightning helper."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .core import GoldenPendulumMTL

__all__ = ["GoldenPendulumCallback", "WeightLogger"]

logger = logging.getLogger(__name__)


class WeightLogger:
    """
    Logs task weights (a dict by task name) every ``log_every`` steps: to this module's logger,
    as a JSON line ``{"step", "weights", "balance_ratio"}`` appended to ``log_file``, and as
    scalars ``golden_pendulum/weight_{name}`` and ``golden_pendulum/balance_ratio`` of a
    TensorBoard writer, as ``golden_pendulum.WeightLogger``.

    (:class:`torchjd_golden.WeightLogger` is a forward hook for any torchjd weighting instead.)

    :param log_file: The JSON-lines file (its folder is created), or ``None``.
    :param log_every: Log the steps that are multiples of it.
    :param tensorboard_writer: A ``SummaryWriter`` (anything with ``add_scalar``), or ``None``.
    """

    def __init__(
        self, log_file: str | None = None, log_every: int = 100, tensorboard_writer: Any = None
    ) -> None:
        self.log_file = Path(log_file) if log_file else None
        self.log_every = log_every
        self.tb_writer = tensorboard_writer
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, weights: Mapping[str, float]) -> None:
        """Records the weights of ``step`` if it is a multiple of ``log_every``."""

        if step % self.log_every != 0:
            return
        largest = max(weights.values()) if weights else 0.0
        balance = min(weights.values()) / largest if largest else 0.0
        parts = ", ".join(f"{name}={w:.4f}" for name, w in weights.items())
        logger.info("Step %d | weights: %s | balance: %.3f", step, parts, balance)
        if self.log_file:
            record = {"step": step, "weights": dict(weights), "balance_ratio": round(balance, 4)}
            with self.log_file.open("a") as file:
                file.write(json.dumps(record) + "\n")
        if self.tb_writer is not None:
            for name, w in weights.items():
                self.tb_writer.add_scalar(f"golden_pendulum/weight_{name}", w, step)
            self.tb_writer.add_scalar("golden_pendulum/balance_ratio", balance, step)


class GoldenPendulumCallback:
    """
    Golden Pendulum for a Lightning ``training_step`` with manual optimisation, as
    ``golden_pendulum.GoldenPendulumCallback``: :meth:`on_train_batch` replaces
    ``loss.backward()``.

    :param lam: Strength of the pull towards the golden-ratio targets.
    :param n_iter: Number of QP steps.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    :param log_every: Log the balance every ``log_every`` batches.
    """

    def __init__(
        self, lam: float = 0.5, n_iter: int = 25, pcgrad: bool = True, log_every: int = 100
    ) -> None:
        self.balancer = GoldenPendulumMTL(lam=lam, n_iter=n_iter, pcgrad=pcgrad)
        self.log_every = log_every

    def on_train_batch(
        self, losses: Mapping[str, Tensor], model: nn.Module, batch_idx: int
    ) -> dict[str, float]:
        """Fills the gradients of ``model`` and returns the weights by task name."""

        weights = self.balancer.backward(losses, model)
        if batch_idx % self.log_every == 0:
            logger.info(
                "Step %d | Golden Pendulum balance: %.3f | weights: %s",
                batch_idx,
                self.balancer.weight_balance_ratio,
                {name: round(w, 4) for name, w in weights.items()},
            )
        return weights
