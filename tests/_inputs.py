"""Jacobians used across the tests."""

from __future__ import annotations

import torch
from torch import Tensor


def conflicting_jacobian(
    m: int,
    n: int,
    *,
    seed: int,
    decades: float = 6.0,
    rank: int = 3,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """
    A Jacobian whose rows mix a few shared directions with random signs (so many pairs
    conflict), plus a little noise, with row norms spread log-uniformly over ``decades``.
    """

    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    mixing = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    rows = mixing @ directions + 0.1 * torch.randn(m, n, generator=generator, dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True)
    exponents = decades * (torch.rand(m, generator=generator, dtype=torch.float64) - 0.5)
    return (rows * 10.0 ** exponents.unsqueeze(1)).to(dtype)


def low_rank_matrix(m: int, n: int, rank: int, *, seed: int) -> Tensor:
    """A float32 matrix of the given rank with unit-scale singular values."""

    generator = torch.Generator().manual_seed(seed)
    if rank == 0:
        return torch.zeros(m, n)
    left = torch.linalg.qr(torch.randn(m, m, generator=generator))[0][:, :rank]
    right = torch.linalg.qr(torch.randn(n, n, generator=generator))[0][:rank]
    singular_values = torch.rand(rank, generator=generator) + 0.5
    return left @ torch.diag(singular_values) @ right


_SHAPES = [(1, 1, 1), (2, 5, 2), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9), (4, 3, 0)]
_SCALES = [0.0, 1e-10, 1e3, 1e5, 1e10, 1e15]

typical_matrices = [low_rank_matrix(m, n, r, seed=i) for i, (m, n, r) in enumerate(_SHAPES)]
scaled_matrices = [scale * matrix for scale in _SCALES for matrix in typical_matrices]
