"""
DynamicK: what grouping saves. For K tasks in groups of 4 and n parameters (float32), the median
time of one aggregation call of :class:`~torchjd_golden.DynamicK` (only the groups' Gramian
blocks), of the same with ``pcgrad_across_groups=True`` (the reference's maths, on the full
Gramian), of golden-pendulum-mtl's ``DynamicK`` chain once it has the gradients (its own
functions, on n-long rows), and of the floor ``J J^T + w J``; every ratio is to the floor of the
same run. Calls rotate through three Jacobians.

Run: ``python -m benchmarks.dynamic_k [--quick]``
"""

from __future__ import annotations

import argparse
import platform

import torch
from golden_pendulum.core import _pcgrad_resolve, _solve_golden_qp
from golden_pendulum.core import golden_ratio_weights as reference_targets
from torch import Tensor

from torchjd_golden import DynamicK, TaskGroup

from .gcond import _floor, conflicting_jacobians, interleaved_medians, rotating

GROUP_SIZE = 4


def groups_of(n_tasks: int) -> list[TaskGroup]:
    return [
        TaskGroup(f"g{start // GROUP_SIZE}", range(start, min(start + GROUP_SIZE, n_tasks)))
        for start in range(0, n_tasks, GROUP_SIZE)
    ]


def reference_chain(jacobian: Tensor) -> Tensor:
    """What ``golden_pendulum.pro.DynamicK.backward`` does with the gradients, step by step."""

    m = jacobian.shape[0]
    normalized = jacobian / jacobian.norm(dim=1, keepdim=True).clamp(min=1e-8)
    groups = [list(range(start, min(start + GROUP_SIZE, m))) for start in range(0, m, GROUP_SIZE)]
    group_alpha = reference_targets(len(groups), dtype=normalized.dtype)
    alpha = torch.zeros(m, dtype=normalized.dtype)
    for beta, rows in zip(group_alpha, groups, strict=True):
        block = normalized[rows]
        targets = reference_targets(len(rows), dtype=normalized.dtype)
        alpha[rows] = beta * _solve_golden_qp(block @ block.T, targets)
    alpha = alpha / alpha.sum()
    return (alpha.unsqueeze(1) * _pcgrad_resolve(normalized, alpha)).sum(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    args = parser.parse_args()
    sizes_m, sizes_n, repeat = ([8, 16], [100_000], 3) if args.quick else ([8, 16, 32], [10**6], 7)

    print(
        f"# DynamicK\n\n{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32\n"
    )
    print("ms per call; in brackets, the ratio to the floor J J^T + w J of the same run\n")
    print("| K | n | floor | DynamicK (blocks) | DynamicK (full Gramian) | golden-pendulum-mtl |")
    print("|---|---|---|---|---|---|")
    for n in sizes_n:
        for m in sizes_m:
            jacobians = conflicting_jacobians(m, n, 3)
            names = {
                "floor": _floor(jacobians),
                "blocks": rotating(DynamicK(groups_of(m)), jacobians),
                "full": rotating(DynamicK(groups_of(m), pcgrad_across_groups=True), jacobians),
                "reference": rotating(reference_chain, jacobians),
            }
            medians = interleaved_medians(names, repeat)
            floor = medians["floor"]
            cells = [
                f"{1e3 * medians[k]:.1f} ({medians[k] / floor:.2f}x)"
                for k in ("blocks", "full", "reference")
            ]
            print(f"| {m} | {n:.0e} | {1e3 * floor:.1f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
