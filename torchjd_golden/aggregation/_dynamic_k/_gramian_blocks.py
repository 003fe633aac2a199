r"""
The Gramian blocks of DynamicK: the inner products within each group only, :math:`\sum_p k_p^2`
of them instead of :math:`K^2`, batched where the groups are runs of consecutive rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._gramian import accumulation_dtype, compute_gramian, overflowed


def block_gramian(matrix: Tensor, blocks: list[list[int]]) -> Tensor:
    """The Gramian of ``matrix`` with only the blocks of the rows ``blocks`` (zeros elsewhere)."""

    # (the first row of a block of consecutive rows, or the rows of another block; its products)
    pieces: list[tuple[int | Tensor, Tensor]] = []
    for rows, count in runs(blocks):
        first, size = rows[0], len(rows)
        if count > 1 and accumulation_dtype(matrix.dtype) == matrix.dtype:
            # Equal blocks of consecutive rows: one batched product on a view of the rows, which
            # a BLAS runs much faster than a thin (size x n) @ (n x size) product per block.
            batch = matrix[first : first + count * size].view(count, size, -1)
            products = torch.bmm(batch, batch.transpose(1, 2))
            if matrix.dtype != torch.float64 and overflowed(products, batch):
                # As compute_gramian: the products of finite rows in float64, on the host path.
                batch = batch.double()
                products = torch.bmm(batch, batch.transpose(1, 2))
            pieces.extend((first + k * size, products[k]) for k in range(count))
        elif rows == list(range(first, first + size)):
            for at in range(first, first + count * size, size):
                pieces.append((at, compute_gramian(matrix[at : at + size])))
        else:
            index = torch.tensor(rows, device=matrix.device)
            pieces.append((index, compute_gramian(matrix.index_select(0, index))))
    m = matrix.shape[0]
    dtype = (
        torch.float64 if any(b.dtype == torch.float64 for _, b in pieces) else pieces[0][1].dtype
    )
    gramian = matrix.new_zeros((m, m), dtype=dtype)
    for where, block in pieces:
        if isinstance(where, int):
            gramian[where : where + block.shape[0], where : where + block.shape[0]] = block
        else:
            gramian[where.unsqueeze(1), where] = block.to(dtype)
    return gramian


def runs(blocks: list[list[int]]) -> list[tuple[list[int], int]]:
    """
    ``blocks`` as (first block, count) runs: a run is ``count`` blocks of consecutive rows of
    one size, each starting where the previous ends.
    """

    runs: list[tuple[list[int], int]] = []
    for rows in blocks:
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        if runs and contiguous:
            first, count = runs[-1]
            follows = first[0] + count * len(first) == rows[0] and len(first) == len(rows)
            if follows and first == list(range(first[0], first[0] + len(first))):
                runs[-1] = (first, count + 1)
                continue
        runs.append((rows, 1))
    return runs
