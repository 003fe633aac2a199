r"""
The Gram core: pure functions on the Gramian :math:`G = J J^\top` shared by every method.

Every method of this package only needs inner products between the rows of the Jacobian
:math:`J \in \mathbb{R}^{m \times n}`, so it works on the :math:`m \times m` Gramian and never
loops over the :math:`n` parameters. A conflict-resolution pass such as PCGrad modifies rows of
:math:`J`; here the resolved rows are tracked as :math:`R = C J` with a coefficient matrix
:math:`C \in \mathbb{R}^{m \times m}`, so that :math:`\langle r_a, r_b \rangle = (C G C^\top)_{ab}`
and the pass costs :math:`O(m^3)` instead of :math:`O(m^2 n)`.

The functions never synchronise the host with an accelerator. The sequential part of a
conflict pass (a loop over pairs of tasks) is dispatch-bound: on an accelerator it runs as tensor
operations that can be queued, traced by :func:`torch.compile` and captured in a CUDA graph; on
the CPU, where there is no device to synchronise with, it runs on Python floats, which is about
sixty times cheaper than dispatching one tiny tensor operation per scalar.
"""

from __future__ import annotations

from operator import sub

import torch
from torch import Tensor

_HALF_PRECISION = (torch.float16, torch.bfloat16)

# Columns upcast at once when a half-precision Jacobian is accumulated in float32: bounds the
# transient copy to about 4 MiB per row instead of a float32 copy of the whole Jacobian.
_UPCAST_CHUNK = 1 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which inner products of ``dtype`` tensors are accumulated: at least float32."""

    return torch.float32 if dtype in _HALF_PRECISION else dtype


def compute_gramian(matrix: Tensor, other: Tensor | None = None) -> Tensor:
    r"""
    Returns :math:`J J^\top` for ``matrix`` :math:`J` of shape ``[m, n]`` (or the cross products
    :math:`J K^\top` when ``other`` :math:`K` is given), in :func:`accumulation_dtype`.

    A half-precision input is upcast in chunks of columns, so the sum of squares neither
    overflows (float16 saturates at 65504) nor loses the small rows to rounding.
    """

    right = matrix if other is None else other
    dtype = accumulation_dtype(matrix.dtype)
    if matrix.dtype == dtype and right.dtype == dtype:
        return matrix @ right.T

    gramian = matrix.new_zeros((matrix.shape[0], right.shape[0]), dtype=dtype)
    for start in range(0, matrix.shape[1], _UPCAST_CHUNK):
        left_block = matrix[:, start : start + _UPCAST_CHUNK].to(dtype)
        right_block = right[:, start : start + _UPCAST_CHUNK].to(dtype)
        gramian.addmm_(left_block, right_block.T)
    return gramian


def combine_rows(weights: Tensor, matrix: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    r"""
    Returns :math:`w^\top J`, in ``dtype`` (by default the dtype of ``matrix``).

    With a half-precision ``matrix`` the product is accumulated in float32 chunk by chunk, so that
    large weights (such as the inverse norms of tiny rows) are not rounded or saturated first.
    """

    accumulation = accumulation_dtype(matrix.dtype)
    if matrix.dtype == accumulation:
        return (weights.to(accumulation) @ matrix).to(dtype or matrix.dtype)

    weights = weights.to(accumulation)
    combination = matrix.new_empty(matrix.shape[1], dtype=dtype or matrix.dtype)
    for start in range(0, matrix.shape[1], _UPCAST_CHUNK):
        block = matrix[:, start : start + _UPCAST_CHUNK].to(accumulation)
        combination[start : start + _UPCAST_CHUNK] = weights @ block
    return combination


def row_norms(gramian: Tensor) -> Tensor:
    r"""The Euclidean norms :math:`\|J_k\| = \sqrt{G_{kk}}` of the rows of :math:`J`."""

    return gramian.diagonal().clamp(min=0.0).sqrt()


def normalize_gramian(gramian: Tensor, min_norm: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""
    Returns the Gramian of the row-normalised Jacobian and the inverse norms used.

    With :math:`d_k = \max(\|J_k\|, \text{min\_norm})` and :math:`s_k = 1/d_k` (:math:`s_k = 0`
    for a zero row), the result is :math:`\hat G = S G S` with :math:`S = \mathrm{diag}(s)`: the
    Gramian of :math:`\hat J = S J`. A zero row gives a zero row and column instead of a NaN, and
    a row shorter than ``min_norm`` is divided by ``min_norm`` (the clamp the references use).
    """

    norms = row_norms(gramian)
    floor = max(min_norm, torch.finfo(gramian.dtype).tiny)
    inverse_norms = torch.where(norms > 0.0, 1.0 / norms.clamp(min=floor), 0.0)
    normalized = gramian * inverse_norms.unsqueeze(1) * inverse_norms.unsqueeze(0)
    return normalized, inverse_norms


def all_finite(tensor: Tensor) -> Tensor:
    """A 0-dim boolean tensor, on the device of ``tensor``, telling whether it has no inf or NaN."""

    return torch.isfinite(tensor).all()


def nan_unless(finite: Tensor, values: Tensor) -> Tensor:
    """``values`` where ``finite`` is true, NaN everywhere otherwise (without a host sync)."""

    return torch.where(finite, values, torch.nan)


# Whether CPU tensors take the Python-float path; the tests turn it off to check the tensor path.
host_solvers_enabled = True


def runs_on_host(tensor: Tensor) -> bool:
    """
    Whether the small sequential solvers should run on Python floats for ``tensor``: true for a
    CPU tensor in eager mode, false on an accelerator and while :func:`torch.compile` traces.
    """

    return (
        host_solvers_enabled and tensor.device.type == "cpu" and not torch.compiler.is_compiling()
    )


def pcgrad_coefficients(gramian: Tensor, priority: Tensor, eps: float = 1e-8) -> Tensor:
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
    """

    if runs_on_host(gramian):
        coefficients = _pcgrad_on_host(gramian.tolist(), priority.tolist(), eps)
        return torch.tensor(coefficients, dtype=gramian.dtype)
    return _pcgrad_on_device(gramian, priority, eps)


def _pcgrad_on_device(gramian: Tensor, priority: Tensor, eps: float) -> Tensor:
    m = gramian.shape[0]
    coefficients = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    lower = priority.unsqueeze(1) < priority.unsqueeze(0)
    for i in range(m):
        for j in range(i + 1, m):
            pair = [i, j]
            rows = coefficients[pair]
            inner = rows @ gramian @ rows.T
            dot = inner[0, 1]
            moving = torch.stack([lower[i, j], ~lower[i, j]]) & (dot < 0.0)
            step = torch.where(moving, dot / (inner.diagonal().flip(0) + eps), 0.0)
            coefficients[pair] = rows - step.unsqueeze(1) * rows.flip(0)
    return coefficients


def _pcgrad_on_host(
    gramian: list[list[float]], priority: list[float], eps: float
) -> list[list[float]]:
    m = len(gramian)
    coefficients = [[float(a == b) for b in range(m)] for a in range(m)]
    inner = [row[:] for row in gramian]  # inner[a][b] = <r_a, r_b>, kept equal to C G C^T
    for i in range(m):
        for j in range(i + 1, m):
            dot = inner[i][j]
            if not dot < 0.0:
                continue
            moved, fixed = (i, j) if priority[i] < priority[j] else (j, i)
            step = dot / (inner[fixed][fixed] + eps)
            _subtract_scaled_row(coefficients, moved, fixed, step)
            _update_inner_products(inner, moved, fixed, step)
    return coefficients


def _subtract_scaled_row(matrix: list[list[float]], target: int, source: int, step: float) -> None:
    matrix[target] = list(map(sub, matrix[target], [step * s for s in matrix[source]]))


def _update_inner_products(inner: list[list[float]], moved: int, fixed: int, step: float) -> None:
    """Keeps ``inner`` equal to :math:`C G C^\\top` after :math:`r_k \\leftarrow r_k - a r_l`."""

    self_product = inner[moved][moved] - 2.0 * step * inner[moved][fixed]
    self_product += step * step * inner[fixed][fixed]
    _subtract_scaled_row(inner, moved, fixed, step)
    inner[moved][moved] = self_product
    for row, value in zip(inner, inner[moved], strict=True):
        row[moved] = value
