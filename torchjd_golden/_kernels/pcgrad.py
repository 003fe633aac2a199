r"""
The sequential PCGrad pass in coefficient space.

The resolved rows are tracked as :math:`R = C J` and their inner products as :math:`D = C G
C^\top`, so the pass reads and writes ``m``-long rows of two ``m x m`` matrices and never an
``n``-long gradient. Projecting rows :math:`a \in A` off a row :math:`b \notin A`, :math:`r_a
\leftarrow r_a - s_a r_b`, updates :math:`C_A \mathrel{-}= s\, C_b`, then the rows
:math:`D_A \mathrel{-}= s\, D_b`, then the columns :math:`D_{:,A} \mathrel{-}= D_{:,b}\, s^\top`
(with :math:`D_{:,b}` as the row update left it): :math:`O(m |A|)` work.

On the host path, pair :math:`(i, j)`'s conflict :math:`D_{ij} < 0` is read for all
:math:`j > i` at once. Until row :math:`i` itself moves, the rows :math:`j` that move all move
off the same :math:`r_i`, so each stretch of them is one batched projection; only the moves of
row :math:`i` are sequential, and pairs without conflict cost nothing. The tensor path visits
every pair with two masked single-row projections.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from ._paths import SolverPath, chosen_path, host_array, solver_dtype

_Matrix = TypeVar("_Matrix", Tensor, NDArray[np.float64])


def pcgrad_coefficients(
    gramian: Tensor, priority: Tensor, *, eps: float = 1e-8, path: SolverPath | None = None
) -> Tensor:
    r"""
    Coefficients :math:`C` of a sequential PCGrad pass: the resolved rows are :math:`R = C J`.

    Pairs are visited in the order :math:`(0, 1), (0, 2), \dots, (m-2, m-1)`. When the current
    rows of a pair conflict (:math:`\langle r_i, r_j \rangle < 0`), the row with the lower
    ``priority`` is projected onto the normal plane of the other, :math:`r_k \leftarrow r_k -
    \frac{\langle r_k, r_l \rangle}{\|r_l\|^2 + \epsilon} r_l`; on a tie, row :math:`j` moves.
    This is the pass of Golden Pendulum's reference (``golden_pendulum.core._pcgrad_resolve``).

    :param gramian: The Gramian of the rows to resolve, shape ``[m, m]``.
    :param priority: One value per row, shape ``[m]``.
    :param eps: Added to the squared norm in the projection, as in the reference.
    :param path: ``"host"``, ``"tensor"`` or ``"auto"`` (see :mod:`._paths`); ``None`` follows
        :func:`~._paths.solver_path`.
    :returns: :math:`C`, in the dtype and on the device of ``gramian``.
    """

    if chosen_path(gramian, path) == "host":
        solution = _pcgrad_on_host(host_array(gramian), host_array(priority), eps)
        return torch.from_numpy(solution).to(dtype=gramian.dtype, device=gramian.device)
    dtype = solver_dtype(gramian.device)
    return _pcgrad_on_tensors(gramian.to(dtype), priority.to(dtype), eps).to(gramian.dtype)


def _pcgrad_on_host(
    inner: NDArray[np.float64], priority: NDArray[np.float64], eps: float
) -> NDArray[np.float64]:
    m = inner.shape[0]
    coefficients = np.eye(m)
    for i in range(m - 1):
        # Where row i is the one that moves (a strictly lower priority); elsewhere row j moves.
        row_i_moves = priority[i] < priority[i + 1 :]
        start = i + 1
        while start < m:
            conflicts = inner[i, start:] < 0.0
            i_moves = conflicts & row_i_moves[start - i - 1 :]
            first = int(i_moves.argmax())
            stop = start + first if i_moves[first] else m
            movers = np.flatnonzero(conflicts[: stop - start])
            if movers.size:
                movers += start
                steps = inner[i, movers] / (inner[i, i] + eps)
                _project_rows_off(coefficients, inner, movers, i, steps)
            if stop == m:
                break
            step = float(inner[i, stop] / (inner[stop, stop] + eps))
            _project_row_off(coefficients, inner, i, stop, step)
            start = stop + 1
    return coefficients


def _project_rows_off(
    coefficients: NDArray[np.float64],
    inner: NDArray[np.float64],
    rows: NDArray[np.intp],
    source: int,
    steps: NDArray[np.float64],
) -> None:
    """:math:`r_a \\leftarrow r_a - s_a r_{source}` for the ``rows`` :math:`a`, in place."""

    coefficients[rows] -= np.outer(steps, coefficients[source])
    inner[rows] -= np.outer(steps, inner[source])
    inner[:, rows] -= np.outer(inner[:, source], steps)


def _project_row_off(
    coefficients: _Matrix, inner: _Matrix, row: int, source: int, step: Any
) -> None:
    """
    :math:`r_{row} \\leftarrow r_{row} - s\\, r_{source}`, in place, on row and column views:
    the same lines on NumPy arrays (``step`` a float) and on tensors (a 0-dim tensor).
    """

    coefficients[row] -= step * coefficients[source]
    inner[row] -= step * inner[source]
    inner[:, row] -= step * inner[:, source]


def _pcgrad_on_tensors(inner: Tensor, priority: Tensor, eps: float) -> Tensor:
    m = inner.shape[0]
    inner = inner.clone()
    coefficients = torch.eye(m, dtype=inner.dtype, device=inner.device)
    for i in range(m - 1):
        for j in range(i + 1, m):
            dot = inner[i, j]
            conflict = dot < 0.0
            i_moves = priority[i] < priority[j]
            step_i = torch.where(conflict & i_moves, dot / (inner[j, j] + eps), 0.0)
            # Zero whenever step_i is not: one of the two projections is a no-op.
            step_j = torch.where(conflict & ~i_moves, dot / (inner[i, i] + eps), 0.0)
            _project_row_off(coefficients, inner, i, j, step_i)
            _project_row_off(coefficients, inner, j, i, step_j)
    return coefficients
