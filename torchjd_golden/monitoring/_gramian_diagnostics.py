"""Conflict diagnostics of one Gramian, as tensors on its device: nothing is read on the host."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..aggregation._gramian import nan_unless, normalize_gramian, row_norms
from ._weighting_calls import task_names

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

    def conflicting_pairs(
        self, tasks: Sequence[Hashable] | None = None
    ) -> list[tuple[Any, Any, float]]:
        """
        The conflicting pairs ``(i, j, cosine)``, ``i < j``, as indices or, given ``tasks``, as
        task names (reads the values on the host).
        """

        names = task_names(tasks, self.norms.shape[0])
        indices = self.conflicts.nonzero().tolist()
        pairs = [(i, j, float(self.cosine[i, j])) for i, j in indices]
        return pairs if tasks is None else [(names[i], names[j], c) for i, j, c in pairs]

    def as_dict(self, tasks: Sequence[Hashable] | None = None) -> dict[str, Any]:
        """
        The report as Python numbers and lists, ready for JSON (reads them on the host). Given
        ``tasks``, the gradient norms are a mapping by task name and the pairs name their tasks,
        as in the reference's ``ConflictReport``.
        """

        norms = self.norms.tolist()
        report: dict[str, Any] = {
            "conflict_ratio": float(self.conflict_ratio),
            "conflicting_pairs": self.conflicting_pairs(tasks),
            "gradient_norms": norms if tasks is None else dict(zip(tasks, norms, strict=True)),
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

    **Checks.** The shapes are always checked (they cost nothing): a ``gramian`` that is not a
    square floating-point matrix (a Jacobian, say) and ``weights`` that are not a vector of
    :math:`m` entries raise a ``ValueError`` naming them. The values of a square matrix that is
    not a Gramian (not symmetric, :math:`\max_{ij} |G_{ij} - G_{ji}| > \sqrt{\epsilon}
    \max_k G_{kk}` with :math:`\epsilon` the dtype's machine epsilon, or a negative diagonal)
    can only be judged by reading them: on the CPU, where that read is free, they raise a
    ``ValueError``; on an accelerator, where it would stall the device, the report instead comes
    out NaN everywhere, so it is never silently wrong. A non-finite Gramian (an overflow step)
    gives a non-finite report without raising.

    >>> import torch
    >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    >>> report = gramian_diagnostics(jacobian @ jacobian.T)
    >>> report.conflicting_pairs(), round(float(report.conflict_ratio), 4)
    ([(0, 1, -0.7071067690849304)], 0.3333)
    >>> gramian_diagnostics(jacobian)
    Traceback (most recent call last):
    ...
    ValueError: Parameter `gramian` must be a square m x m matrix ... Found shape (3, 2).
    """

    _check_gramian_shape(gramian)
    m = gramian.shape[0]
    if weights is not None:
        _check_weights(weights, m)
    is_gramian = _is_gramian(gramian)
    cosine, conflicts, norms, norm_ratio = conflict_statistics(gramian)
    balance = None if weights is None else weights.min() / weights.max()
    report = GramianDiagnostics(
        cosine=cosine,
        conflicts=conflicts,
        conflict_ratio=conflicts.sum() / max(m * (m - 1) // 2, 1),
        norms=norms,
        norm_ratio=norm_ratio,
        balance_ratio=balance,
    )
    return report if is_gramian is None else _nan_unless(is_gramian, report)


def _check_gramian_shape(gramian: object) -> None:
    if not isinstance(gramian, Tensor):
        raise TypeError(f"Parameter `gramian` must be a tensor. Found {type(gramian).__name__}.")
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(
            "Parameter `gramian` must be a square m x m matrix (the Gramian J @ J.T of the "
            f"Jacobian). Found shape {tuple(gramian.shape)}."
        )
    if not gramian.is_floating_point():
        raise ValueError(f"Parameter `gramian` must be floating-point. Found {gramian.dtype}.")


def _check_weights(weights: object, m: int) -> None:
    if not isinstance(weights, Tensor):
        raise TypeError(f"Parameter `weights` must be a tensor. Found {type(weights).__name__}.")
    if weights.shape != (m,):
        raise ValueError(
            f"Parameter `weights` must hold one weight per task: shape ({m},) for this "
            f"{m} x {m} Gramian. Found shape {tuple(weights.shape)}."
        )


def conflict_statistics(
    gramian: Tensor, min_norm: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """
    The cosine matrix (rows shorter than ``min_norm`` divided by it), the boolean upper triangle
    of the conflicting pairs :math:`i < j`, the row norms and :math:`\\max_k \\|J_k\\| /
    \\max(\\min_k \\|J_k\\|, 10^{-10})` of ``gramian``: tensor operations only.
    """

    cosine, _ = normalize_gramian(gramian, min_norm=min_norm)
    norms = row_norms(gramian)
    norm_ratio = norms.max() / norms.min().clamp(min=_MIN_NORM_FOR_RATIO)
    return cosine, (cosine < 0.0).triu(diagonal=1), norms, norm_ratio


def _is_gramian(gramian: Tensor) -> Tensor | None:
    """
    On the CPU, raises unless ``gramian`` is symmetric with a non-negative diagonal, and returns
    ``None``; elsewhere returns that condition as a boolean tensor, without reading it.
    """

    if gramian.device.type == "meta":
        return None
    diagonal = gramian.diagonal()
    tolerance = math.sqrt(torch.finfo(gramian.dtype).eps) * diagonal.max().clamp(min=0.0)
    # NaN compares false, so a non-finite Gramian passes and gives a non-finite report.
    asymmetric = ((gramian - gramian.T).abs() > tolerance).any()
    negative = (diagonal < 0.0).any()
    if gramian.device.type != "cpu" or torch.compiler.is_compiling():
        return ~(asymmetric | negative)
    if asymmetric:
        raise ValueError(
            "Parameter `gramian` is not symmetric, so it is not a Gramian J @ J.T (its largest "
            f"asymmetry is {float((gramian - gramian.T).abs().max()):.3g})."
        )
    if negative:
        raise ValueError(
            "Parameter `gramian` has a negative diagonal entry, so it is not a Gramian J @ J.T "
            f"(its diagonal is {diagonal.tolist()})."
        )
    return None


def _nan_unless(condition: Tensor, report: GramianDiagnostics) -> GramianDiagnostics:
    balance = report.balance_ratio
    return GramianDiagnostics(
        cosine=nan_unless(condition, report.cosine),
        conflicts=report.conflicts & condition,
        conflict_ratio=nan_unless(condition, report.conflict_ratio),
        norms=nan_unless(condition, report.norms),
        norm_ratio=nan_unless(condition, report.norm_ratio),
        balance_ratio=None if balance is None else nan_unless(condition, balance),
    )
