"""Monitoring: conflict diagnostics of a Gramian, and a logger of the weights of any weighting."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ._gramian import compute_gramian, normalize_gramian, row_norms
from ._torchjd_compat import GramianWeightingBase

# The reference's report clamps the smallest norm here before dividing by it.
_MIN_NORM_FOR_RATIO = 1e-10


@dataclass(frozen=True)
class GramianDiagnostics:
    """
    Conflict diagnostics of one Gramian, as tensors on its device: nothing is read on the host
    until the caller asks (:meth:`conflicting_pairs`, :meth:`as_dict`).

    :ivar cosine: The cosines :math:`G_{ij} / (\\|J_i\\| \\|J_j\\|)`, zero for a zero row.
    :ivar conflicts: Boolean mask of the pairs :math:`i < j` with a negative cosine.
    :ivar conflict_ratio: The fraction of the :math:`m(m-1)/2` pairs that conflict.
    :ivar norms: The gradient norms :math:`\\|J_k\\|`.
    :ivar norm_ratio: :math:`\\max_k \\|J_k\\| / \\max(\\min_k \\|J_k\\|, 10^{-10})`.
    :ivar balance_ratio: :math:`\\min_k w_k / \\max_k w_k` of the given weights, or ``None``.
    """

    cosine: Tensor
    conflicts: Tensor
    conflict_ratio: Tensor
    norms: Tensor
    norm_ratio: Tensor
    balance_ratio: Tensor | None

    def conflicting_pairs(self) -> list[tuple[int, int, float]]:
        """The conflicting pairs ``(i, j, cosine)``, ``i < j`` (reads the values on the host)."""

        indices = self.conflicts.nonzero().tolist()
        return [(i, j, float(self.cosine[i, j])) for i, j in indices]

    def as_dict(self) -> dict[str, Any]:
        """The report as Python numbers and lists, ready for JSON (reads them on the host)."""

        report: dict[str, Any] = {
            "conflict_ratio": float(self.conflict_ratio),
            "conflicting_pairs": self.conflicting_pairs(),
            "gradient_norms": self.norms.tolist(),
            "norm_ratio": float(self.norm_ratio),
        }
        if self.balance_ratio is not None:
            report["balance_ratio"] = float(self.balance_ratio)
        return report


def gramian_diagnostics(gramian: Tensor, weights: Tensor | None = None) -> GramianDiagnostics:
    r"""
    The conflict report of ``golden_pendulum.pro.DiagnosticsEngine`` computed from the Gramian
    :math:`G = J J^\top`: cosine matrix, conflict ratio and conflicting pairs, gradient norms and
    their max/min ratio, and, given task weights, their min/max balance ratio (for Golden
    Pendulum, pass its QP solution ``alpha``).

    Everything stays on the Gramian's device and no value is read on the host, so it can run at
    every step without stalling an accelerator.

    >>> import torch
    >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    >>> report = gramian_diagnostics(jacobian @ jacobian.T)
    >>> report.conflicting_pairs(), round(float(report.conflict_ratio), 4)
    ([(0, 1, -0.7071067690849304)], 0.3333)
    """

    m = gramian.shape[0]
    cosine, _ = normalize_gramian(gramian)
    conflicts = (cosine < 0.0).triu(diagonal=1)
    n_pairs = max(m * (m - 1) // 2, 1)
    norms = row_norms(gramian)
    balance = None if weights is None else weights.min() / weights.max()
    return GramianDiagnostics(
        cosine=cosine,
        conflicts=conflicts,
        conflict_ratio=conflicts.sum() / n_pairs,
        norms=norms,
        norm_ratio=norms.max() / norms.min().clamp(min=_MIN_NORM_FOR_RATIO),
        balance_ratio=balance,
    )


class WeightLogger:
    """
    A forward hook for any torchjd weighting (ours or torchjd's) that logs the weights it
    returns: as JSON lines in a file, and as TensorBoard scalars.

    .. code-block:: python

        logger = WeightLogger("weights.jsonl", tensorboard_dir="runs/mtl", every=10)
        aggregator.gramian_weighting.register_forward_hook(logger)  # or aggregator.weighting

    Every ``every``-th call writes one line ``{"step", "method", "weights", "balance_ratio"}``
    (plus the :func:`gramian_diagnostics` report when ``diagnostics=True``) and the scalars
    ``{tag}/weight_{k}`` and ``{tag}/balance_ratio`` (and ``{tag}/conflict_ratio``,
    ``{tag}/norm_ratio``; the input is taken as a Gramian for a Gramian weighting, as a Jacobian
    otherwise). Logging reads the values on the host, so it synchronises with an
    accelerator on the logged steps only. Call :meth:`close` (or use it as a context manager) to
    flush the files.

    :param path: The JSON-lines file, or ``None`` for none.
    :param tensorboard_dir: A directory for a new ``torch.utils.tensorboard.SummaryWriter``.
    :param writer: An existing ``SummaryWriter`` (or anything with ``add_scalar``) to use instead.
    :param every: Log one call out of ``every``.
    :param diagnostics: Also log the conflict diagnostics of the weighting's input.
    :param tag: The prefix of the TensorBoard scalars.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        tensorboard_dir: str | Path | None = None,
        writer: Any = None,
        every: int = 1,
        diagnostics: bool = False,
        tag: str = "weights",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"Parameter `every` must be a positive integer. Found every={every!r}."
            )
        if writer is not None and tensorboard_dir is not None:
            raise ValueError("Give either `writer` or `tensorboard_dir`, not both.")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - needs tensorboard

            writer = SummaryWriter(log_dir=str(tensorboard_dir))
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer
        self.every, self.diagnostics, self.tag = every, diagnostics, tag
        self._file = None if path is None else Path(path).open("a")  # noqa: SIM115 - closed by close()
        self.step = 0

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], weights: Tensor) -> None:
        step, self.step = self.step, self.step + 1
        if step % self.every:
            return
        values = weights.detach().float()
        record: dict[str, Any] = {
            "step": step,
            "method": str(module),
            "weights": values.tolist(),
            "balance_ratio": float(values.min() / values.max()),
        }
        if self.diagnostics:
            stat = inputs[0].detach()
            gramian = stat if isinstance(module, GramianWeightingBase) else compute_gramian(stat)
            record |= gramian_diagnostics(gramian).as_dict()
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.writer is not None:
            for k, value in enumerate(record["weights"]):
                self.writer.add_scalar(f"{self.tag}/weight_{k}", value, step)
            for key in ("balance_ratio", "conflict_ratio", "norm_ratio"):
                if key in record:
                    self.writer.add_scalar(f"{self.tag}/{key}", record[key], step)

    def close(self) -> None:
        """Closes the JSON-lines file and the writer this logger created."""

        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None and self._owns_writer:
            self.writer.close()

    def __enter__(self) -> WeightLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
