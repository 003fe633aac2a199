"""
Aggregation only: time per call against the floor, peak memory per call, and cost growth.

- ``time``: for m in {2, 8, 16} and n in {1e5, 1e6, 4e6}, each method's median time per call
  divided by the floor (``J @ J.T`` + ``w @ J``, measured in the same rounds; for ExcessMTL the
  floor also has one in-place pass ``S += J * J`` over an m x n accumulator): ours, torchjd's
  built-ins (Mean, UPGrad, PCGrad, GradVac, ExcessMTL) and the references (golden-pendulum-mtl's
  QP + PCGrad chain; the official GCond ``_project`` when ``--gcond-reference`` points at a copy
  of ``grad_conductor.py``). Calls rotate through three distinct Jacobians.
- ``memory``: the rise of the resident memory during one call, as a multiple of the Jacobian's
  size, each method in a fresh process (first call, with the state it allocates, then a later
  call).
- ``growth``: time against m and n, with the fitted exponents, for the resolution stage (the
  weighting on a given Gramian) and for the whole call.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from golden_pendulum.core import _pcgrad_resolve, _solve_golden_qp
from golden_pendulum.core import golden_ratio_weights as reference_targets
from torch import Tensor
from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL
from torchjd.aggregation import GradVac, Mean, PCGrad, UPGrad

from torchjd_golden import (
    GABA,
    ExcessMTL,
    GCond,
    GCondWeighting,
    GoldenPendulum,
    GoldenPendulumWeighting,
)
from torchjd_golden.aggregation._kernels.gcond import resolve_conflicts

from ._measure import median_seconds, peak_memory_supported
from .gcond import _floor, conflicting_jacobians, interleaved_medians, official_project, rotating

OURS: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
    "GoldenPendulum": GoldenPendulum,
    "GABA": lambda: GABA(warmup_steps=0),
    "ExcessMTL": ExcessMTL,
    "GCond": GCond,
}
TORCHJD: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
    "Mean": Mean,
    "UPGrad": UPGrad,
    "PCGrad": PCGrad,
    "GradVac": GradVac,
    "torchjd ExcessMTL": TorchJDExcessMTL,
}
TARGETS = {"GoldenPendulum": 1.3, "GABA": 1.3, "GCond": 2.0, "ExcessMTL": 2.5}


def golden_reference_chain(jacobian: Tensor) -> Tensor:
    """What ``golden_nash_backward`` does once it has the gradients: its own functions, in order."""

    norms = jacobian.norm(dim=1, keepdim=True).clamp(min=1e-8)
    normalized = jacobian / norms
    gramian = normalized @ normalized.T
    alpha = _solve_golden_qp(gramian, reference_targets(jacobian.shape[0], dtype=gramian.dtype))
    return (alpha.unsqueeze(1) * _pcgrad_resolve(normalized, alpha)).sum(dim=0)


def time_table(
    sizes_m: list[int], sizes_n: list[int], repeat: int, gcond_reference: ModuleType | None
) -> list[dict[str, float]]:
    rows = []
    for n in sizes_n:
        for m in sizes_m:
            jacobians = conflicting_jacobians(m, n, 3)
            functions = {"floor": _floor(jacobians), "ExcessMTL floor": _excess_floor(jacobians)}
            functions |= {
                name: rotating(make(), jacobians) for name, make in {**OURS, **TORCHJD}.items()
            }
            medians = interleaved_medians(functions, repeat)
            references: dict[str, Callable[[Tensor], object]] = {
                "golden-pendulum-mtl": golden_reference_chain
            }
            if gcond_reference is not None:
                references["official GCond"] = _official_gcond(gcond_reference, m, n)
            for name, function in references.items():
                call = functools.partial(function, jacobians[0])
                medians[name] = median_seconds(call, repeat=1 if n >= 4e6 else 3, warmup=0)
            floor = medians.pop("floor")
            row = {"m": m, "n": n, "floor ms": 1e3 * floor}
            row |= {name: seconds / floor for name, seconds in medians.items()}
            row["ExcessMTL"] = medians["ExcessMTL"] / medians["ExcessMTL floor"]
            row["ExcessMTL vs torchjd"] = medians["ExcessMTL"] / medians["torchjd ExcessMTL"]
            row.pop("ExcessMTL floor")
            rows.append(row)
    return rows


def _official_gcond(reference: ModuleType, m: int, n: int) -> Callable[[Tensor], object]:
    """The official ``_project`` on a Jacobian, loading it as the accumulated gradients first."""

    load, project = official_project(reference, m, n)

    def call(jacobian: Tensor) -> object:
        load(jacobian)
        return project()

    return call


def _excess_floor(jacobians: list[Tensor]) -> Callable[[], object]:
    """The floor plus one in-place pass over an m x n accumulator, ``S += J * J``."""

    accumulator = torch.zeros_like(jacobians[0])
    weights = torch.ones(jacobians[0].shape[0])

    def floor(jacobian: Tensor) -> None:
        _ = jacobian @ jacobian.T
        accumulator.addcmul_(jacobian, jacobian)
        _ = weights @ jacobian

    return rotating(floor, jacobians)


def print_time_table(rows: list[dict[str, float]]) -> None:
    columns = [c for c in rows[0] if c not in ("m", "n", "floor ms")]
    print("## Time per call / floor (ExcessMTL: / its floor with the S += J*J pass)\n")
    print("| m | n | floor ms | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.2f}" if row[c] < 100 else f"{row[c]:.0f}" for c in columns]
        print(
            f"| {row['m']} | {row['n']:.0e} | {row['floor ms']:.1f} | " + " | ".join(cells) + " |"
        )
    print("\nTargets at n = 1e6 (m = 8 and 16):\n")
    for row in rows:
        if row["n"] != 1_000_000 or row["m"] not in (8, 16):
            continue
        checks = [f"{name} {row[name]:.2f} (<= {limit})" for name, limit in TARGETS.items()]
        checks.append(f"ExcessMTL vs torchjd {row['ExcessMTL vs torchjd']:.2f} (<= 0.5)")
        print(f"- m = {row['m']}: " + ", ".join(checks))
    print()


_MEMORY_PROBE = """
import json, sys, torch
from benchmarks.aggregation import OURS, TORCHJD, golden_reference_chain
from benchmarks._measure import extra_peak_bytes
name, m, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
factories = {**OURS, **TORCHJD, "golden-pendulum-mtl": lambda: golden_reference_chain}
make = factories[name]
warm = make()  # loads the code pages of the operations (and NumPy's BLAS buffers) first
for _ in range(3):
    warm(torch.randn(m, 100))
jacobian = torch.randn(m, n)
function = make()
size = jacobian.numel() * jacobian.element_size()
first = extra_peak_bytes(lambda: function(jacobian)) / size
later = extra_peak_bytes(lambda: function(jacobian)) / size
print(json.dumps({"first": first, "later": later}))
"""


def memory_table(m: int, n: int) -> None:
    print(
        f"## Peak memory of one call, m = {m}, n = {n:.0e} (x the Jacobian's size, fresh process)\n"
    )
    if not peak_memory_supported():
        print("skipped: needs Linux's /proc/self/clear_refs\n")
        return
    print("| method | first call (with its state) | later call |")
    print("|---|---|---|")
    root = Path(__file__).resolve().parents[1]
    for name in [*OURS, *TORCHJD, "golden-pendulum-mtl"]:
        result = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, name, str(m), str(n)],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        ratios = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {name} | {ratios['first']:.2f} | {ratios['later']:.2f} |")
    print()


def growth_table(repeat: int) -> None:
    """Fitted exponents of time ~ m^a n^b, resolution stage and whole call."""

    print("## Cost growth: time ~ m^a * n^b (least squares on log-log)\n")
    sizes_m, sizes_n = [2, 4, 8, 16, 32], [100_000, 300_000, 1_000_000]
    stages: dict[str, Callable[[Tensor], Callable[[], object]]] = {
        "GoldenPendulum resolve (weighting on G)": _golden_resolve,
        "GCond resolve (m x m loop)": _gcond_resolve,
        "GoldenPendulum whole call": lambda j: rotating(GoldenPendulum(), [j]),
        "GCond whole call": lambda j: rotating(GCond(), [j]),
    }
    print(
        "| stage | " + " | ".join(f"m={m}" for m in sizes_m) + " | exponent in m | exponent in n |"
    )
    print("|---|" + "---|" * (len(sizes_m) + 2))
    for stage, build in stages.items():
        samples = []  # (m, n, seconds)
        for n in sizes_n:
            for m in sizes_m:
                jacobian = conflicting_jacobians(m, n, 1)[0]
                call = build(jacobian)
                samples.append((m, n, median_seconds(call, repeat=repeat, warmup=0)))
        a, b = _fit(samples)
        at_largest_n = [seconds for _, n, seconds in samples if n == sizes_n[-1]]
        cells = " | ".join(f"{1e3 * s:.2f}" for s in at_largest_n)
        print(f"| {stage} | {cells} | {a:.2f} | {b:.2f} |")
    print(
        f"\n(ms at n = {sizes_n[-1]:.0e}; the exponents fit every (m, n) with n in "
        f"{', '.join(f'{n:.0e}' for n in sizes_n)})\n"
    )


def _golden_resolve(jacobian: Tensor) -> Callable[[], object]:
    gramian, weighting = jacobian @ jacobian.T, GoldenPendulumWeighting()
    return lambda: weighting(gramian)


def _gcond_resolve(jacobian: Tensor) -> Callable[[], object]:
    m = jacobian.shape[0]
    gramian = jacobian @ jacobian.T
    weighting = GCondWeighting()
    weighting(jacobian)  # one step, for a previous Jacobian and norm averages
    settings = weighting._settings(m)
    return lambda: resolve_conflicts(
        gramian,
        gramian,
        weighting.previous_norms_sq,
        weighting.norm_ema,
        weighting.winner_history,
        weighting.winner_count,
        settings,
    )


def _fit(samples: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Least squares of log t = c + a log m + b log n."""

    rows = torch.tensor(
        [[1.0, math.log(m), math.log(n)] for m, n, _ in samples], dtype=torch.float64
    )
    times = torch.tensor([math.log(s) for _, _, s in samples], dtype=torch.float64)
    solution = torch.linalg.lstsq(rows, times.unsqueeze(1)).solution.squeeze(1)
    return float(solution[1]), float(solution[2])
