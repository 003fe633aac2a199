r"""
The sequential PCGrad pass in coefficient space.

The resolved rows are tracked as :math:`R = C J` and their inner products as :math:`D = C G
C^\top`, so the pass reads and writes ``m``-long rows of an ``m x m`` matrix and never an
``n``-long gradient. Projecting rows :math:`a \in A` off a row :math:`b \notin A`, :math:`r_a
\leftarrow r_a - s_a r_b`, updates the rows :math:`D_A \mathrel{-}= s\, D_b`, then the columns
:math:`D_{:,A} \mathrel{-}= D_{:,b}\, s^\top` (with :math:`D_{:,b}` as the row update left it):
:math:`O(m |A|)` work.

On the host path, pair :math:`(i, j)`'s conflict :math:`D_{ij} < 0` is read for all :math:`j > i`
at once. Until row :math:`i` itself moves, the rows :math:`j` that move all move off the same
:math:`r_i`, so each stretch of them is one batched projection; only the moves of row :math:`i`
are sequential, and pairs without conflict cost nothing. Once its pairs are done, row :math:`i`
is never read again, so its own moves update its row of :math:`D` only. The moves are recorded,
and the combination :math:`w^\top C` is read off them backwards at the end, one scalar (or one
batch) per move: :math:`w^\top (I - s\, e_a e_b^\top) = w^\top - s\, w_a e_b^\top`. The tensor
path visits every pair with two masked single-row projections and keeps :math:`C`.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from ._paths import SolverPath, chosen_path, host_array, solver_dtype

# Rows of D past a move of row i whose moves run in Python floats, one block at a time.
_WINDOW = 16
# Up to this many rows that move off the same row are projected one by one.
_ONE_BY_ONE = 3

# One move of the pass, in order: rows ``rows`` lose ``steps`` times row ``source``.
_Move = tuple[int, int | slice | NDArray[np.intp], float | NDArray[np.float64]]


def pcgrad_combination(
    gramian: Tensor,
    priority: Tensor,
    weights: Tensor,
    *,
    eps: float = 1e-8,
    path: SolverPath | None = None,
) -> Tensor:
    r"""
    :math:`w^\top C`, where :math:`C` are the coefficients of a sequential PCGrad pass: the
    resolved rows are :math:`R = C J`, so :math:`w^\top R = (w^\top C) J`.

    Pairs are visited in the order :math:`(0, 1), (0, 2), \dots, (m-2, m-1)`. When the current
    rows of a pair conflict (:math:`\langle r_i, r_j \rangle < 0`), the row with the lower
    ``priority`` is projected onto the normal plane of the other, :math:`r_k \leftarrow r_k -
    \frac{\langle r_k, r_l \rangle}{\|r_l\|^2 + \epsilon} r_l`; on a tie, row :math:`j` moves.
    This is the pass of Golden Pendulum's reference (``golden_pendulum.core._pcgrad_resolve``).

    :param gramian: The Gramian of the rows to resolve, shape ``[m, m]``.
    :param priority: One value per row, shape ``[m]``.
    :param weights: :math:`w`, shape ``[m]``, or several as the rows of a ``[k, m]`` matrix.
    :param eps: Added to the squared norm in the projection, as in the reference.
    :param path: ``"host"``, ``"tensor"`` or ``"auto"`` (see :mod:`._paths`); ``None`` follows
        :func:`~._paths.solver_path`.
    :returns: :math:`w^\top C`, shaped like ``weights``, in the dtype and on the device of
        ``gramian``.
    """

    if chosen_path(gramian, path) == "host":
        combination = _pcgrad_on_host(
            host_array(gramian), host_array(priority), eps, host_array(weights)
        )
        return torch.from_numpy(combination).to(dtype=gramian.dtype, device=gramian.device)
    dtype = solver_dtype(gramian.device)
    coefficients = _pcgrad_on_tensors(gramian.to(dtype), priority.to(dtype), eps)
    return (weights.to(dtype) @ coefficients).to(gramian.dtype)


def pcgrad_coefficients(
    gramian: Tensor, priority: Tensor, *, eps: float = 1e-8, path: SolverPath | None = None
) -> Tensor:
    """The whole :math:`C` of :func:`pcgrad_combination`'s pass (its combination with :math:`I`)."""

    identity = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return pcgrad_combination(gramian, priority, identity, eps=eps, path=path)


def _pcgrad_on_host(
    inner: NDArray[np.float64],
    priority: NDArray[np.float64],
    eps: float,
    weights: NDArray[np.float64],
) -> NDArray[np.float64]:
    m = inner.shape[0]
    i_moves = priority[:, None] < priority[None, :]  # Where row i, not row j, moves.
    # 0 where row i moves, -inf where row j does: row < limits flags the moves of row i.
    limits = np.where(i_moves, 0.0, -np.inf)
    moves: list[_Move] = []
    for i in range(m - 1):
        row = inner[i]
        start = i + 1
        while start < m:
            conflicts = row[start:] < 0.0
            stop = start + int(conflicts.argmax())
            if not conflicts[stop - start]:
                break
            if not i_moves[i, stop]:
                # A stretch of rows that move off row i, up to the next move of row i itself.
                first = stop
                i_moves_after = row[first:] < limits[i, first:]
                stop = first + int(i_moves_after.argmax())
                if not i_moves_after[stop - first]:
                    stop = m
                movers = conflicts[first - start : stop - start].nonzero()[0] + first
                _project_rows_off(inner, movers, i, eps, moves)
                if stop == m:
                    break
            start = _move_row_i_off_window(inner, i, stop, i_moves[i], eps, moves)
    # Rows of the transpose, so that each move reads and writes whole rows.
    combination = np.array(weights.T, order="C")
    for source, rows, steps in reversed(moves):
        if isinstance(steps, float):
            combination[source] -= steps * combination[rows]
        else:
            combination[source] -= steps @ combination[rows]
    return np.ascontiguousarray(combination.T)


def _move_row_i_off_window(
    inner: NDArray[np.float64],
    i: int,
    start: int,
    i_moves: NDArray[np.bool_],
    eps: float,
    moves: list[_Move],
) -> int:
    """
    The moves of row :math:`i` off the conflicting rows of a window of ``_WINDOW`` rows from
    ``start`` (a move of row :math:`i`), up to the first conflict where the other row moves;
    returns where the pass goes on.

    Each move changes row :math:`i`'s inner products with the rows after it, so the moves are
    sequential: they run in Python floats on the window's block of :math:`D`, and their effect on
    the rest of row :math:`i` is one vector-matrix product. Only row :math:`i` of :math:`D` is
    updated, as nothing reads its column before the pass is done with it; its diagonal is what
    a row update and then a column update would leave, in their order.
    """

    stop = min(int(inner.shape[0]), start + _WINDOW)
    row = inner[i]
    dots = row[start:stop].tolist()
    block = inner[start:stop, start:stop].tolist()
    allowed = i_moves[start:stop].tolist()
    squared_norm = float(row[i])
    steps = [0.0] * (stop - start)  # Zero off the conflicts: a slice, not rows picked by index.
    for k in range(stop - start):
        dot = dots[k]
        if not dot < 0.0:
            continue
        if not allowed[k]:
            stop = start + k
            break
        block_row = block[k]
        step = dot / (block_row[k] + eps)
        squared_norm = (squared_norm - step * dot) - step * (dot - step * block_row[k])
        for q in range(k + 1, stop - start):
            dots[q] -= step * block_row[q]
        steps[k] = step
        moves.append((start + k, i, step))
    # The window starts with a move, so there is at least one.
    row -= np.array(steps[: stop - start]) @ inner[start:stop]
    row[i] = squared_norm
    return stop


def _project_rows_off(
    inner: NDArray[np.float64],
    rows: NDArray[np.intp],
    source: int,
    eps: float,
    moves: list[_Move],
) -> None:
    """
    :math:`r_a \\leftarrow r_a - s_a r_{source}` for the ``rows`` :math:`a` (increasing), in
    place. The moves commute (they all read :math:`r_{source}`, which none of them changes), so
    they can be made one row at a time, or as one: a NumPy call costs more than its arithmetic at
    these sizes, and fancy indexing several times a slice. A few rows go one by one; rows that
    fill at least half of their span update the span as a slice, with zero steps for the rows
    between them (which leaves those rows as they are); other rows update by index.
    """

    low, high = int(rows[0]), int(rows[-1]) + 1
    with_source = inner[source].copy()  # <r_source, r_k>, kept current as the rows move
    squared_norm = with_source[source] + eps
    if rows.size <= _ONE_BY_ONE:
        for row in rows.tolist():
            step = float(with_source[row] / squared_norm)
            inner[row] -= step * with_source
            with_source[row] -= step * with_source[source]
            inner[:, row] -= step * with_source
            moves.append((source, row, step))
        return
    steps: NDArray[np.float64]
    where: slice | NDArray[np.intp]
    if 2 * rows.size >= high - low:
        steps, where = np.zeros(high - low), slice(low, high)
        steps[rows - low] = with_source[rows] / squared_norm
    else:
        steps, where = with_source[rows] / squared_norm, rows
    inner[where] -= np.outer(steps, with_source)
    with_source[where] -= steps * with_source[source]
    inner[:, where] -= np.outer(with_source, steps)
    moves.append((source, where, steps))


def _project_row_off(
    coefficients: Tensor, inner: Tensor, row: int, source: int, step: Tensor
) -> None:
    """:math:`r_{row} \\leftarrow r_{row} - s\\, r_{source}`, in place, on row and column views."""

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
