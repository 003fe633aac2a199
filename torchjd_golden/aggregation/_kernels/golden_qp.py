r"""
Golden Pendulum's QP: projected gradient descent towards the golden-ratio targets.

Each of the ``n_iter`` steps is one ``m x m`` matrix-vector product and a few ``m``-long vector
operations, on both paths.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from ._paths import SolverPath, chosen_path, host_array, solver_dtype


def solve_golden_qp(
    normalized_gramian: Tensor,
    targets: Tensor,
    lam: float | Tensor,
    n_iter: int,
    min_weight: float,
    *,
    path: SolverPath | None = None,
) -> Tensor:
    r"""
    Projected gradient descent on :math:`\alpha^\top \hat G \alpha + \lambda \|\alpha -
    \alpha^\varphi\|_1` over the simplex, started at the targets :math:`\alpha^\varphi`.

    Step :math:`t` is :math:`\alpha \leftarrow \alpha - \eta_t (2 \hat G \alpha + \lambda\,
    \mathrm{sign}(\alpha - \alpha^\varphi))` with :math:`\eta_t = 0.05 / (1 + 0.1 t)`, followed by
    a clamp at ``min_weight`` and a renormalisation, as in golden-pendulum-mtl's
    ``_solve_golden_qp``. With ``min_weight = 0`` a step can clamp every weight to zero: it is then
    skipped (:math:`\alpha` keeps its value) where the reference divides zero by zero. A NaN
    anywhere propagates to :math:`\alpha`.

    :param normalized_gramian: :math:`\hat G`, shape ``[m, m]``.
    :param targets: :math:`\alpha^\varphi`, shape ``[m]``.
    :param lam: :math:`\lambda`, a number or a 0-dim tensor (the adaptive variant's).
    :param n_iter: The number of steps.
    :param min_weight: The floor of every :math:`\alpha_k` (absolute, not a fraction).
    :param path: ``"host"``, ``"tensor"`` or ``"auto"``; ``None`` follows
        :func:`~._paths.solver_path`.
    :returns: :math:`\alpha`, in the dtype and on the device of ``normalized_gramian``.
    """

    if chosen_path(normalized_gramian, path) == "host":
        solution = _golden_qp_on_host(
            host_array(normalized_gramian), host_array(targets), float(lam), n_iter, min_weight
        )
        return torch.from_numpy(solution).to(
            dtype=normalized_gramian.dtype, device=normalized_gramian.device
        )
    dtype = solver_dtype(normalized_gramian.device)
    gramian, start = normalized_gramian.to(dtype), targets.to(dtype)
    alpha = start
    for t in range(n_iter):
        step = 0.05 / (1.0 + 0.1 * t)
        descent = 2.0 * (gramian @ alpha) + lam * torch.sign(alpha - start)
        stepped = (alpha - step * descent).clamp(min=min_weight)
        total = stepped.sum()
        alpha = torch.where(total == 0.0, alpha, stepped / total)
    return alpha.to(normalized_gramian.dtype)


def _golden_qp_on_host(
    gramian: NDArray[np.float64],
    targets: NDArray[np.float64],
    lam: float,
    n_iter: int,
    min_weight: float,
) -> NDArray[np.float64]:
    # In place on two buffers: at small m, a NumPy call costs more than its arithmetic.
    doubled = 2.0 * gramian
    alpha, pull = targets.copy(), np.empty_like(targets)
    for t in range(n_iter):
        step = 0.05 / (1.0 + 0.1 * t)
        np.subtract(alpha, targets, out=pull)
        np.sign(pull, out=pull)
        pull *= lam
        pull += doubled @ alpha
        pull *= step
        np.subtract(alpha, pull, out=pull)
        np.maximum(pull, min_weight, out=pull)
        total = pull.sum()
        if total != 0.0:  # else every weight was clamped to zero: the step is skipped
            np.divide(pull, total, out=alpha)
    solution: NDArray[np.float64] = alpha
    return solution
