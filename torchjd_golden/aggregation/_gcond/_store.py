r"""
GCond's store of the previous step's rows: the state behind its stability score.

The score of task :math:`k` reads :math:`\langle r_k, p_k \rangle`, with :math:`p_k` the task's
resolved row of the previous step. The store keeps the previous Jacobian :math:`J_{prev}` and the
coefficients :math:`C_{prev}` of its resolution (:math:`P = C_{prev} J_{prev}`) instead of
:math:`P`: a step then costs one streamed pass over :math:`J` for :math:`J [H_0; H_1]^\top`, and
no product :math:`C J`. ``jacobians`` has two regions of :math:`R` rows: one holds
:math:`J_{prev}`, the other receives :math:`J` and becomes the previous one only if the step is
finite (``previous_half`` tells which). Each row is tagged with its task (``region_tasks``, -1
for none), so that tasks named by the caller find their own previous row whatever its position.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._gramian import (
    compute_gramian,
    gramian_and_cross_products,
    in_column_blocks,
    over_all_columns,
    overflowed,
)


class Store(NamedTuple):
    """The store's buffers (those of :class:`~torchjd_golden.GCondWeighting`)."""

    jacobians: Tensor  # [2R, n]
    region_tasks: Tensor  # [2R]
    previous_half: Tensor  # 0 or 1
    previous_coefficients: Tensor  # [R, R], float64
    previous_norms_sq: Tensor  # [R], float64


def store_products(matrix: Tensor, store: Store, task_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""
    This step's Gramian, the cross products :math:`X_{ti} = \langle J_t, p_i \rangle` with the
    previous resolved row :math:`p_i` of the same task (zero for a task absent from the previous
    step, in float64 as the resolution that reads them) and :math:`\|p_i\|^2`. :math:`J` goes into
    the scratch region, tagged with ``task_ids``.
    """

    m, capacity = matrix.shape[0], store.jacobians.shape[0] // 2
    gramian, cross = gramian_and_cross_products(matrix, store.jacobians, store.previous_half)
    if in_column_blocks():  # both are sums over the columns: one reduction for the two
        joined = over_all_columns(torch.cat([gramian.reshape(-1), cross.reshape(-1)]))
        gramian, cross = joined[: m * m].view(m, m), joined[m * m :].view(m, -1)
    positions = torch.arange(capacity, device=matrix.device)
    scratch = torch.where(store.previous_half == 0, positions + capacity, positions)
    previous = torch.where(store.previous_half == 0, positions, positions + capacity)
    if overflowed(gramian, matrix):  # float32 rows longer than 1.8e19: products in float64
        gramian = compute_gramian(matrix)
        cross = compute_gramian(matrix, store.jacobians.index_select(0, previous))
    scratch_tasks = nn.functional.pad(task_ids, (0, capacity - m), value=-1)
    store.region_tasks.index_copy_(0, scratch, scratch_tasks)
    # Previous row r holds task previous_tasks[r]: the one-hot match picks, for each task of this
    # step, its own previous row (exactly: a product by one and sums of zeros).
    previous_tasks = store.region_tasks.index_select(0, previous)
    match = (task_ids.unsqueeze(1) == previous_tasks.unsqueeze(0)).to(torch.float64)
    cross = (cross.to(torch.float64) @ store.previous_coefficients.T) @ match.T
    return gramian, cross, match @ store.previous_norms_sq


def grown_store(store: Store, rows: int) -> Store:
    """The store with ``rows`` rows per region, holding what it held."""

    capacity, n = store.jacobians.shape[0] // 2, store.jacobians.shape[1]
    extra = rows - capacity
    regions = store.jacobians.view(2, capacity, n)
    tasks = store.region_tasks.view(2, capacity)
    return Store(
        jacobians=nn.functional.pad(regions, (0, 0, 0, extra)).reshape(2 * rows, n),
        region_tasks=nn.functional.pad(tasks, (0, extra), value=-1).reshape(2 * rows),
        previous_half=store.previous_half,
        previous_coefficients=nn.functional.pad(store.previous_coefficients, (0, extra, 0, extra)),
        previous_norms_sq=nn.functional.pad(store.previous_norms_sq, (0, extra)),
    )


def checkpoint_form(destination: dict[str, Any], prefix: str) -> None:
    """
    Replaces the store in a ``state_dict`` by the previous region and its tasks only
    (``previous_jacobian``, ``previous_tasks``): the other region is scratch space.
    """

    jacobians = destination.pop(prefix + "jacobians")
    tasks = destination.pop(prefix + "region_tasks")
    half = destination.pop(prefix + "previous_half")
    rows = jacobians.shape[0] // 2
    start = rows * int(half) if jacobians.numel() else 0  # a host read, in checkpointing only
    destination[prefix + "previous_jacobian"] = jacobians[start : start + rows]
    destination[prefix + "previous_tasks"] = tasks[start : start + rows]


def store_from_checkpoint(state_dict: dict[str, Any], prefix: str) -> None:
    """
    Rebuilds, in a ``state_dict``, the store from a checkpoint's previous region (the inverse of
    :func:`checkpoint_form`), including checkpoints written before 0.2 (no task tags, float32
    coefficients and norms).
    """

    for name in ("previous_coefficients", "previous_norms_sq"):
        saved = state_dict.get(prefix + name)
        if isinstance(saved, Tensor) and saved.is_floating_point():
            state_dict[prefix + name] = saved.to(torch.float64)
    previous = state_dict.pop(prefix + "previous_jacobian", None)
    tasks = state_dict.pop(prefix + "previous_tasks", None)
    if isinstance(previous, Tensor):
        if not isinstance(tasks, Tensor):  # rows in order, without names
            tasks = torch.arange(previous.shape[0])
        # The region an uninterrupted run would hold it in (each finite step flips it, from 0):
        # the products come out of other columns of one matmul otherwise, which can round
        # differently, and the resumed run would not be bit-identical.
        steps = state_dict.get(prefix + "step_count")
        half = int(steps) % 2 if isinstance(steps, Tensor) and steps.numel() == 1 else 0
        scratch, no_tasks = torch.zeros_like(previous), torch.full_like(tasks, -1)
        regions = [(previous, tasks), (scratch, no_tasks)]
        if half:
            regions.reverse()
        state_dict[prefix + "jacobians"] = torch.cat([regions[0][0], regions[1][0]])
        state_dict[prefix + "region_tasks"] = torch.cat([regions[0][1], regions[1][1]])
        state_dict[prefix + "previous_half"] = torch.tensor(half, dtype=torch.int64)
