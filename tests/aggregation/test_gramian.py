from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from torchjd_golden.aggregation import _gramian
from torchjd_golden.aggregation._gramian import (
    accumulation_dtype,
    all_finite,
    combine_rows,
    compute_gramian,
    nan_unless,
    normalize_gramian,
    row_norms,
)

from .._asserts import relative_error
from .._inputs import conflicting_jacobian


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_accumulation_dtype_is_at_least_float32(dtype: torch.dtype, expected: torch.dtype) -> None:
    assert accumulation_dtype(dtype) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gramian_of_full_precision_matrix(dtype: torch.dtype) -> None:
    matrix = conflicting_jacobian(5, 40, seed=0, dtype=dtype)
    gramian = compute_gramian(matrix)
    assert gramian.dtype == dtype
    assert_close(gramian, matrix @ matrix.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_half_precision_gramian_is_accumulated_in_float32(
    dtype: torch.dtype, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_gramian, "_UPCAST_CHUNK", chunk)
    # Entries of 300 over 1000 columns: the squared norms (about 9e7) overflow float16.
    matrix = (300.0 * torch.randn(3, 1000)).to(dtype)
    exact = matrix.double() @ matrix.double().T

    gramian = compute_gramian(matrix)

    assert gramian.dtype == torch.float32
    assert gramian.isfinite().all()
    assert relative_error(gramian, exact) < 1e-6
    if dtype == torch.float16:
        assert not (matrix @ matrix.T).isfinite().all()  # what plain half precision gives


def test_cross_gramian() -> None:
    left = conflicting_jacobian(3, 20, seed=1)
    right = conflicting_jacobian(4, 20, seed=2)
    assert_close(compute_gramian(left, right), left @ right.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_rows_in_full_precision(dtype: torch.dtype) -> None:
    matrix = conflicting_jacobian(4, 30, seed=3, dtype=dtype)
    weights = torch.rand(4, dtype=dtype)
    assert_close(combine_rows(weights, matrix), weights @ matrix)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_combine_rows_accumulates_half_precision_in_float32(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_gramian, "_UPCAST_CHUNK", chunk)
    # Large weights on tiny rows, as Golden Pendulum gives them: float16 weights would saturate.
    matrix = (1e-3 * torch.randn(3, 50)).half()
    weights = torch.tensor([1e5, 2e5, 1.0])
    exact = weights.double() @ matrix.double()

    combination = combine_rows(weights, matrix)

    assert combination.dtype == torch.float16
    assert relative_error(combination, exact) < 1e-3
    assert not (weights.half() @ matrix).isfinite().all()


def test_row_norms() -> None:
    matrix = conflicting_jacobian(6, 30, seed=4)
    assert_close(row_norms(matrix @ matrix.T), matrix.norm(dim=1))


def test_normalized_gramian_is_gramian_of_normalized_rows() -> None:
    matrix = conflicting_jacobian(6, 30, seed=5, decades=12.0)
    normalized, inverse_norms = normalize_gramian(compute_gramian(matrix))
    unit_rows = matrix / matrix.norm(dim=1, keepdim=True)
    assert_close(normalized, unit_rows @ unit_rows.T)
    assert_close(inverse_norms, 1.0 / matrix.norm(dim=1))


def test_normalized_gramian_of_zero_and_tiny_rows() -> None:
    matrix = conflicting_jacobian(4, 30, seed=6, decades=0.0)
    matrix[1] = 0.0
    matrix[2] *= 1e-10
    normalized, inverse_norms = normalize_gramian(compute_gramian(matrix), min_norm=1e-8)

    assert normalized.isfinite().all()
    assert (normalized[1] == 0.0).all()
    assert (normalized[:, 1] == 0.0).all()
    assert inverse_norms[1] == 0.0
    # A row shorter than min_norm is divided by min_norm, as the references clamp.
    assert_close(inverse_norms[2], torch.tensor(1e8, dtype=torch.float64))
    clamped = matrix / matrix.norm(dim=1, keepdim=True).clamp(min=1e-8)
    assert_close(normalized, clamped @ clamped.T)


def test_all_finite_and_nan_unless() -> None:
    values = torch.tensor([1.0, 2.0])
    assert bool(all_finite(values))
    assert not bool(all_finite(torch.tensor([1.0, torch.inf])))
    assert not bool(all_finite(torch.tensor([torch.nan])))
    assert torch.equal(nan_unless(torch.tensor(True), values), values)
    assert nan_unless(torch.tensor(False), values).isnan().all()
