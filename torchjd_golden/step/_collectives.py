r"""
The collectives of a multi-process step, for a Jacobian whose columns are spread over the ranks.

Two layouts reach the aggregation:

- **replicated** (DDP): every rank holds all :math:`n` columns of its own batch's Jacobian
  :math:`J_r`; the step's Jacobian is their mean :math:`\bar J = \frac1R \sum_r J_r`;
- **sharded** (FSDP2): every rank holds its shard's columns of :math:`\bar J` already (FSDP's
  reduce-scatter averaged them).

:class:`ColumnBlocks` turns the first into the second (one reduce-scatter), and back (one
all-gather of the update). Everything here is a plain ``torch.distributed`` call on a process
group; nothing reads a value on the host.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

ReduceOp = Literal["sum", "max", "min"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class RankGroup:
    """A process group, its size and this process's rank in it."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        """Reduces ``tensor`` over the ranks, in place, and returns it."""

        dist.all_reduce(tensor, op=_OPS[op], group=self.group)
        return tensor

    def average_gradients(self, parameters: list[Tensor]) -> None:
        """Replaces the ``.grad`` of ``parameters`` (zeros where there is none) by their mean over
        the ranks, as DDP would, in one all-reduce."""

        if not parameters:
            return
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in parameters
            ]
        )
        self.all_reduce(flat).div_(self.size)
        pieces = torch.split(flat, [p.numel() for p in parameters])
        for parameter, piece in zip(parameters, pieces, strict=True):
            parameter.grad = piece.view_as(parameter)

    def all_reduce_rows(self, tensor: Tensor, op: ReduceOp) -> Tensor:
        """
        A row statistic of the whole Jacobian from the rows of this rank's block of columns (the
        hook :func:`~torchjd_golden.aggregation._gramian.column_blocks` installs): a new tensor, the
        argument untouched.
        """

        return self.all_reduce(tensor.clone(), op)

    def all_gather_columns(self, block: Tensor) -> tuple[Tensor, int]:
        """
        The blocks of columns of every rank side by side, in rank order (blocks may have
        different widths, as FSDP's uneven shards do), and the index of this rank's first column.
        """

        widths = torch.tensor([block.shape[1]], device=block.device)
        gathered_widths = [torch.empty_like(widths) for _ in range(self.size)]
        dist.all_gather(gathered_widths, widths, group=self.group)
        sizes = [int(width) for width in gathered_widths]  # a host read: the fallback path only
        padded = block.new_zeros(block.shape[0], max(sizes))
        padded[:, : block.shape[1]] = block
        pieces = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(pieces, padded, group=self.group)
        whole = torch.cat([piece[:, :size] for piece, size in zip(pieces, sizes, strict=True)], 1)
        return whole, sum(sizes[: self.rank])


class ColumnBlocks:
    r"""
    The split of :math:`n` columns into one block per rank, of width :math:`\lceil n / R \rceil`
    (the last ones padded with zero columns, which change no inner product).
    """

    def __init__(self, ranks: RankGroup, n: int) -> None:
        self.ranks, self.n = ranks, n
        self.width = -(-n // ranks.size)

    def reduce_scatter_mean(self, matrix: Tensor) -> Tensor:
        r"""This rank's block of :math:`\frac1R \sum_r J_r`, from its ``matrix`` :math:`J_r`."""

        m = matrix.shape[0]
        blocks = matrix.new_zeros(self.ranks.size, m, self.width)
        for rank, start in enumerate(range(0, self.n, self.width)):
            columns = matrix[:, start : start + self.width]
            blocks[rank, :, : columns.shape[1]] = columns
        block = matrix.new_empty(m, self.width)
        dist.reduce_scatter(block, list(blocks.unbind(0)), group=self.ranks.group)
        return block.div_(self.ranks.size)

    def all_gather(self, block: Tensor) -> Tensor:
        """The vector of all columns from each rank's block of it."""

        pieces = [torch.empty_like(block) for _ in range(self.ranks.size)]
        dist.all_gather(pieces, block.contiguous(), group=self.ranks.group)
        return torch.cat(pieces)[: self.n]
