"""
ExcessMTL: time and peak memory of one call, ours against torchjd's, relative to the floor.

The floor is what any Gramian-based aggregator pays: ``J @ J.T`` plus ``w @ J``. The memory
figures are the rise of the process's resident memory during a call, as a multiple of the size
of the Jacobian: the first call includes the m x n state that both implementations allocate.

Run: ``python -m benchmarks.excess_mtl [--m 8] [--n 4000000] [--repeat 7]``
"""

from __future__ import annotations

import argparse

import torch
from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL

from torchjd_golden import ExcessMTL

from ._measure import extra_peak_bytes, median_seconds, peak_memory_supported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=8, help="number of tasks (rows of J)")
    parser.add_argument("--n", type=int, default=4_000_000, help="number of parameters")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per method")
    args = parser.parse_args()

    torch.manual_seed(0)
    jacobian = torch.randn(args.m, args.n) * torch.logspace(-2, 2, args.m).unsqueeze(1)
    weights = torch.rand(args.m)
    size = jacobian.numel() * jacobian.element_size()

    def floor() -> None:
        _ = jacobian @ jacobian.T
        _ = weights @ jacobian

    rows = []
    floor_seconds = median_seconds(floor, args.repeat)
    for name, factory in (("torchjd-golden", ExcessMTL), ("torchjd 0.18", TorchJDExcessMTL)):
        factory()(jacobian[:, :1000].clone())  # loads the code pages of the ops first
        aggregator = factory()
        first = (
            extra_peak_bytes(lambda a=aggregator: a(jacobian)) if peak_memory_supported() else -1
        )
        later = (
            extra_peak_bytes(lambda a=aggregator: a(jacobian)) if peak_memory_supported() else -1
        )
        seconds = median_seconds(lambda a=aggregator: a(jacobian), args.repeat)
        rows.append((name, seconds, first / size, later / size))
        del aggregator

    print(
        f"ExcessMTL, m={args.m}, n={args.n:.0e}, float32, J = {size / 2**20:.0f} MiB, "
        f"{torch.get_num_threads()} threads; floor (J J^T + w J) = {1e3 * floor_seconds:.1f} ms\n"
    )
    print(
        "| implementation | ms / call | x floor | extra peak, first call (x J) "
        "| extra peak, later call (x J) |"
    )
    print("|---|---|---|---|---|")
    for name, seconds, first, later in rows:
        print(
            f"| {name} | {1e3 * seconds:.1f} | {seconds / floor_seconds:.2f} | {first:.2f} "
            f"| {later:.2f} |"
        )
    ours, theirs = rows[0][1], rows[1][1]
    print(f"\nours / torchjd time: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
