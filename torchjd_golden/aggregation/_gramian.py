r"""
The Gram core: pure functions on the Gramian :math:`G = J J^\top` shared by every method.

Every method of this package only needs inner products between the rows of the Jacobian
:math:`J \in \mathbb{R}^{m \times n}`, so it works on the :math:`m \times m` Gramian and never
loops over the :math:`n` parameters. A conflict-resolution pass such as PCGrad modifies rows of
:math:`J`; the kernels (:mod:`._kernels`) track the resolved rows as :math:`R = C J` with a
coefficient matrix :math:`C \in \mathbb{R}^{m \times m}`, so that :math:`\langle r_a, r_b
\rangle = (C G C^\top)_{ab}` and a pass never touches an :math:`n`-long gradient.

The functions here never synchronise the host with an accelerator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
from torch import Tensor

from ._kernels._paths import chosen_path

_HALF_PRECISION = (torch.float16, torch.bfloat16)

# Columns upcast at once when a half-precision Jacobian is accumulated in float32: bounds the
# transient copy to about 4 MiB per row instead of a float32 copy of the whole Jacobian.
_UPCAST_CHUNK = 1 << 20

# Elements of the Jacobian copied and multiplied at once by gramian_and_cross_products: a chunk
# stays in cache between the two.
_STREAM_CHUNK = 1 << 19


RowReduction = Callable[[Tensor, Literal["sum", "max", "min"]], Tensor]
"""Reduces a row statistic (a sum, max or min over columns) of one block of columns over all."""

_row_reduction: ContextVar[RowReduction | None] = ContextVar(
    "torchjd_golden_row_reduction", default=None
)


@contextmanager
def column_blocks(reduction: RowReduction) -> Iterator[None]:
    r"""
    Within the ``with`` block, the Jacobians the methods receive are one block of columns of the
    whole Jacobian (this process's, in a multi-process step), and ``reduction`` turns a statistic
    of the rows of the block (a sum, max or min over its columns) into that of the whole rows.
    A method that splits over columns calls :func:`over_all_columns` on every such statistic
    (inner products, sums of squares, largest entries, finiteness) before it uses it, so that
    every block computes the same weights; its per-column state then covers its block only.
    """

    token = _row_reduction.set(reduction)
    try:
        yield
    finally:
        _row_reduction.reset(token)


def in_column_blocks() -> bool:
    """
    Whether the methods receive a block of columns of the Jacobian (:func:`column_blocks`); never
    while :func:`torch.compile` traces, which cannot read the context (the step engine gives a
    compiled method the whole Jacobian).
    """

    return not torch.compiler.is_compiling() and _row_reduction.get() is not None


def over_all_columns(statistic: Tensor, op: Literal["sum", "max", "min"] = "sum") -> Tensor:
    """
    ``statistic`` of the rows of the whole Jacobian, given that of the rows of the block of columns
    the method received (itself outside of :func:`column_blocks`).
    """

    if not in_column_blocks():
        return statistic
    reduction = _row_reduction.get()
    assert reduction is not None
    return reduction(statistic, op)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which inner products of ``dtype`` tensors are accumulated: at least float32."""

    return torch.float32 if dtype in _HALF_PRECISION else dtype


def compute_gramian(matrix: Tensor, other: Tensor | None = None) -> Tensor:
    r"""
    Returns :math:`J J^\top` for ``matrix`` :math:`J` of shape ``[m, n]`` (or the cross products
    :math:`J K^\top` when ``other`` :math:`K` is given), in :func:`accumulation_dtype`.

    A half-precision input is upcast in chunks of columns, so the sum of squares neither
    overflows (float16 saturates at 65504) nor loses the small rows to rounding.

    A finite input whose products overflow the accumulation dtype (float32 rows longer than
    :math:`1.8 \cdot 10^{19}`) gets them in float64 instead, on the host path (a CPU tensor in
    eager mode, see :mod:`._kernels`): the check reads the result, which would synchronise an
    accelerator, where such a Gramian stays non-finite (as it does in a multi-process step,
    :func:`column_blocks`).
    """

    right = matrix if other is None else other
    dtype = accumulation_dtype(matrix.dtype)
    if matrix.dtype == dtype and right.dtype == dtype:
        gramian = matrix @ right.T
    else:
        gramian = _upcast_products(matrix, right, dtype)
    if dtype != torch.float64 and overflowed(gramian, matrix, right):
        gramian = _upcast_products(matrix, right, torch.float64)
    return gramian


def _upcast_products(matrix: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """:math:`J K^\top` in ``dtype``, upcasting chunks of columns (no full-size copy)."""

    gramian = matrix.new_zeros((matrix.shape[0], right.shape[0]), dtype=dtype)
    for start in range(0, matrix.shape[1], _UPCAST_CHUNK):
        left_block = matrix[:, start : start + _UPCAST_CHUNK].to(dtype)
        right_block = right[:, start : start + _UPCAST_CHUNK].to(dtype)
        gramian.addmm_(left_block, right_block.T)
    return gramian


def overflowed(products: Tensor, *inputs: Tensor) -> bool:
    """
    Whether ``products`` of finite ``inputs`` overflowed their dtype: checked on the host path
    only (it reads values), and reading the inputs only when the products are not finite.
    """

    # In a multi-process step the ranks must agree without another collective: as on an
    # accelerator, an overflowing Gramian stays non-finite there (the step is skipped).
    if chosen_path(products) != "host" or in_column_blocks() or bool(all_finite(products)):
        return False
    return all(bool(all_finite(tensor)) for tensor in inputs)


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


def gramian_and_cross_products(
    matrix: Tensor, store: Tensor, previous_half: Tensor
) -> tuple[Tensor, Tensor]:
    r"""
    Returns :math:`G = J J^\top` and :math:`Y = J H_{prev}^\top`, and copies :math:`J` (``m``
    rows) into the first rows of the half of ``store`` (shape ``[2R, n]``, :math:`R \geq m`) that
    does not hold :math:`H_{prev}`; ``previous_half`` (0 or 1, a tensor) tells which half does.
    Both products are in :func:`accumulation_dtype`; :math:`Y` has a column per row of the half.

    Both products come from :math:`J\,[H_0; H_1]^\top`, computed over chunks of columns: each
    chunk of :math:`J` is read once, copied and multiplied while in cache, so the pass streams
    :math:`J` once. The rows to write are chosen by tensor indexing: nothing synchronises with
    the host, and the caller keeps :math:`H_{prev}` for a non-finite step by not flipping
    ``previous_half``.
    """

    m, n = matrix.shape
    half = store.shape[0] // 2
    dtype = accumulation_dtype(matrix.dtype)
    rows = torch.arange(m, device=matrix.device)
    scratch_rows = torch.where(previous_half == 0, rows + half, rows)
    products = torch.zeros(m, 2 * half, dtype=dtype, device=matrix.device)
    width = max(1, _STREAM_CHUNK // half)
    for start in range(0, n, width):
        block = matrix[:, start : start + width]
        halves = store[:, start : start + width]
        halves.index_copy_(0, scratch_rows, block)
        products.addmm_(block.to(dtype), halves.to(dtype).T)
    first, second = products[:, :half], products[:, half:]
    gramian = torch.where(previous_half == 0, second, first)[:, :m]
    cross = torch.where(previous_half == 0, first, second)
    return gramian, cross
