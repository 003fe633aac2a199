"""
Long runs: many calls of each stateful aggregator on random Jacobians stay finite and keep their
memory flat (the state does not grow, no autograd graph is retained, no tensor leaks).

Each call gets a fresh Jacobian whose row norms spread over six decades, with
``requires_grad=True`` so that a retained graph would show. The table compares the first
measurement (after a warm-up of ``calls // 10`` calls, once the state and the allocator's pools
exist) with the last: the resident memory of the process, the number of live tensors and the
bytes of state.

Run: ``python -m benchmarks.long_run [--calls 10000] [--m 8] [--n 1000]``
"""

from __future__ import annotations

import argparse
import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchjd_golden import GABA, AdaptiveGoldenPendulum, ExcessMTL, GCond

from ._measure import resident_bytes

STATEFUL: dict[str, Callable[[], nn.Module]] = {
    "AdaptiveGoldenPendulum": AdaptiveGoldenPendulum,
    "GABA": lambda: GABA(warmup_steps=10),
    "ExcessMTL": lambda: ExcessMTL(n_warmup_steps=10),
    "GCond": GCond,
}


@dataclass
class LongRun:
    """What a long run measured, first (after the warm-up) and last."""

    name: str
    calls: int
    all_finite: bool
    graph_retained: bool
    state_bytes: tuple[int, int]
    live_tensors: tuple[int, int]
    resident_bytes: tuple[int, int]


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, Tensor))


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def long_run(name: str, calls: int, m: int = 8, n: int = 1000, seed: int = 0) -> LongRun:
    """Calls the aggregator ``name`` of ``STATEFUL`` ``calls`` times on random Jacobians."""

    generator = torch.Generator().manual_seed(seed)
    aggregator = STATEFUL[name]()
    warm_up = max(1, calls // 10)
    all_finite, graph_retained = True, False
    first: tuple[int, int, int] | None = None
    for call in range(calls):
        if call == warm_up:
            first = (_state_bytes(aggregator), _live_tensors(), resident_bytes())
        scales = 10.0 ** (6.0 * torch.rand(m, 1, generator=generator) - 3.0)
        jacobian = (torch.randn(m, n, generator=generator) * scales).requires_grad_(True)
        if isinstance(aggregator, AdaptiveGoldenPendulum):
            aggregator.losses = torch.rand(m, generator=generator) + 0.1
        output = aggregator(jacobian)
        all_finite &= bool(output.isfinite().all())
        graph_retained |= output.requires_grad or any(
            t.requires_grad for t in aggregator.state_dict().values()
        )
    assert first is not None, "calls must exceed 1"
    last = (_state_bytes(aggregator), _live_tensors(), resident_bytes())
    return LongRun(
        name,
        calls,
        all_finite,
        graph_retained,
        (first[0], last[0]),
        (first[1], last[1]),
        (first[2], last[2]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--m", type=int, default=8, help="number of tasks (rows of J)")
    parser.add_argument("--n", type=int, default=1000, help="number of parameters")
    args = parser.parse_args()
    print(f"{args.calls} calls on random {args.m} x {args.n} float32 Jacobians\n")
    print(
        "| aggregator | finite | graph retained | state bytes first → last "
        "| live tensors first → last | resident MiB first → last |"
    )
    print("|---|---|---|---|---|---|")
    for name in STATEFUL:
        run = long_run(name, args.calls, args.m, args.n)
        mib = [b / 2**20 for b in run.resident_bytes]
        print(
            f"| {name} | {run.all_finite} | {run.graph_retained} "
            f"| {run.state_bytes[0]} → {run.state_bytes[1]} "
            f"| {run.live_tensors[0]} → {run.live_tensors[1]} "
            f"| {mib[0]:.1f} → {mib[1]:.1f} ({mib[1] - mib[0]:+.1f}) |"
        )


if __name__ == "__main__":
    main()
