r"""
GCond's conflict resolution (the official ``_project`` loop) in coefficient space.

The rows being resolved are :math:`R = C J` and their inner products :math:`D = C G C^\top`.
An iteration finds the pair with the smallest cosine, lets the arbitrator name a winner, and
replaces the pair's rows by a :math:`2 \times 2` mix of the old ones, :math:`(r_f, r_s)
\leftarrow M (r_f, r_s)`: :math:`C_{fs} \leftarrow M C_{fs}`, then the rows :math:`D_{fs}
\leftarrow M D_{fs}` and the columns :math:`D_{:,fs} \leftarrow D_{:,fs} M^\top`. Both paths use
this one convention, :mod:`._host` with Python floats, :mod:`._tensor` with its tensor twin.

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

import numpy as np
import torch
from torch import Tensor

from .._paths import SolverPath, chosen_path
from ._host import HostResolution
from ._settings import ZONES, Resolution, ResolveSettings
from ._tensor import TensorResolution

__all__ = ["ZONES", "Resolution", "ResolveSettings", "resolve_conflicts"]


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
            return HostResolution(*inputs).run()
    return TensorResolution(*inputs).run()
