"""
Many tasks, from m = 2 to m = 512 (``python -m benchmarks --sections tasks``).

- ``time``: for n in {1e5, 1e6} and m in {2, 8, 16, 32, 64, 128, 256, 512}, each method's median
  time per call divided by the floor ``J @ J.T`` + ``w @ J`` measured in the same rounds, its
  milliseconds, and the peak memory a later call adds (as a multiple of the Jacobian's size,
  measured in a child process whose allocator returns every large block to the system). At
  n = 1e6 the sizes stop at m = 256: the Jacobian alone is 2 GB at m = 512, and each of the three
  the calls rotate through is another. Beside ours: golden-pendulum-mtl's chain (QP, then PCGrad
  on the n-long rows) and torchjd's UPGrad and PCGrad, each until one call takes more than
  ``BUDGET_SECONDS`` (then it is not run at larger sizes).
- ``growth``: the exponent a of time ~ m^a of each method's own stage, fitted from m = 32 to 512:
  the weighting on a given Gramian (Golden Pendulum, its adaptive variant, GABA, torchjd's),
  ExcessMTL's weighting on the Jacobian (n = 1e5), GCond's arbitration loop on given products,
  and golden-pendulum-mtl's QP and PCGrad pass on the normalised rows (n = 1e5).
- ``precision``: at m = 512 (n = 1000), the largest relative error of each method in float32,
  float16 and bfloat16 against float64 on the same rounded input, over three calls.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from golden_pendulum.core import _pcgrad_resolve, _solve_golden_qp
from golden_pendulum.core import golden_ratio_weights as reference_targets
from torch import Tensor
from torchjd.aggregation import PCGrad, PCGradWeighting, UPGrad, UPGradWeighting

from torchjd_golden import (
    GABA,
    AdaptiveGoldenPendulum,
    AdaptiveGoldenPendulumWeighting,
    ExcessMTL,
    ExcessMTLWeighting,
    GABAWeighting,
    GCond,
    GCondWeighting,
    GoldenPendulum,
    GoldenPendulumWeighting,
)
from torchjd_golden.aggregation._kernels.gcond import resolve_conflicts

from ._measure import extra_peak_bytes, peak_memory_supported
from .aggregation import golden_reference_chain
from .gcond import _floor, conflicting_jacobians, interleaved_medians, rotating

SIZES_M = [2, 8, 16, 32, 64, 128, 256, 512]
SIZES_N = [100_000, 1_000_000]
LARGEST_JACOBIAN_BYTES = 1 << 30  # 1 GiB: m = 256 at n = 1e6
BUDGET_SECONDS = 3.0

OURS: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
    "GoldenPendulum": GoldenPendulum,
    "AdaptiveGoldenPendulum": lambda: AdaptiveGoldenPendulum(loss_ratio_aware=False),
    "GABA": lambda: GABA(warmup_steps=0),
    "ExcessMTL": ExcessMTL,
    "GCond": GCond,
}
OTHERS: dict[str, Callable[[], Callable[[Tensor], object]]] = {
    "golden-pendulum-mtl": lambda: golden_reference_chain,
    "torchjd UPGrad": UPGrad,
    "torchjd PCGrad": PCGrad,
}
# Where the issue asks for a bound (ratio to the floor, at m in {64, 128, 256} for the first three).
TARGETS = {
    "GoldenPendulum": 1.5,
    "AdaptiveGoldenPendulum": 1.5,
    "GABA": 1.5,
    "ExcessMTL": 3.0,
    "GCond": 2.5,
}


def _gcond_floor(jacobians: list[Tensor]) -> Callable[[], object]:
    """
    What GCond cannot skip: ``J`` copied into the store of previous rows, ``J [J; J_prev]^T`` (the
    Gramian and the cross products with the previous rows, one product) and ``w @ J``.
    """

    m, n = jacobians[0].shape
    store = torch.zeros(2 * m, n)
    weights = torch.rand(m)

    def floor(jacobian: Tensor) -> None:
        store[m:].copy_(jacobian)
        _ = jacobian @ store.T
        _ = weights @ jacobian

    return rotating(floor, jacobians)


def _sizes(sizes_m: list[int], sizes_n: list[int]) -> list[tuple[int, int]]:
    return [(m, n) for n in sizes_n for m in sizes_m if 4 * m * n <= LARGEST_JACOBIAN_BYTES]


def time_rows(sizes_m: list[int], sizes_n: list[int], repeat: int) -> list[dict[str, float | str]]:
    """One row per (m, n): the floor's ms, then (ratio, ms) per method, or why it did not run."""

    rows: list[dict[str, float | str]] = []
    over_budget: dict[str, str] = {}  # name -> where one call first took too long
    for m, n in _sizes(sizes_m, sizes_n):
        jacobians = conflicting_jacobians(m, n, 3)
        functions = {"floor": _floor(jacobians), "GCond floor": _gcond_floor(jacobians)}
        functions |= {name: rotating(make(), jacobians) for name, make in OURS.items()}
        medians = interleaved_medians(functions, repeat)
        gcond_floor = medians.pop("GCond floor")
        for name, make in OTHERS.items():
            if name in over_budget:
                continue
            call = rotating(make(), jacobians)
            start = time.perf_counter()
            call()
            first = time.perf_counter() - start
            if first > BUDGET_SECONDS:
                over_budget[name] = f"> {BUDGET_SECONDS:.0f} s at m = {m}, n = {n:.0e}"
                medians[name] = first
                continue
            medians[name] = interleaved_medians({name: call}, 1 if first > 0.5 else repeat)[name]
        floor = medians.pop("floor")
        row: dict[str, float | str] = {"m": m, "n": n, "floor ms": 1e3 * floor}
        row["GCond / its floor"] = medians["GCond"] / gcond_floor
        for name in [*OURS, *OTHERS]:
            if name in medians:
                row[name] = medians[name] / floor
                row[f"{name} ms"] = 1e3 * medians[name]
            else:
                row[name] = f"not run ({over_budget[name]})"
        rows.append(row)
        del jacobians, functions
    return rows


_MEMORY_PROBE = """
import json, sys
from benchmarks.tasks import memory_ratios
print(json.dumps(memory_ratios(json.loads(sys.argv[1]))))
"""


def memory_ratios(sizes: list[list[int]]) -> dict[str, float]:
    """
    In this process (started with ``MALLOC_MMAP_THRESHOLD_`` set low, so that every block the
    calls allocate is mapped and unmapped, and the resident size follows them): for each (m, n)
    and method, the peak that a later call adds, over the Jacobian's size.
    """

    ratios = {}
    for m, n in sizes:
        jacobian = conflicting_jacobians(m, n, 1)[0]
        size = jacobian.numel() * jacobian.element_size()
        for name, make in OURS.items():
            call = rotating(make(), [jacobian])
            call()  # the first call allocates the state
            call()  # the first with a previous step (and the first use of some of torch's paths)
            ratios[f"{name} {m} {n}"] = extra_peak_bytes(call) / size
            del call
    return ratios


def memory_by_size(sizes: list[tuple[int, int]]) -> dict[str, float] | None:
    if not peak_memory_supported():
        return None
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, json.dumps(sizes)],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    ratios: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return ratios


def print_time_table(
    rows: list[dict[str, float | str]], memory: dict[str, float] | None, repeat: int
) -> None:
    print(
        "## Many tasks: time per call / floor (J J^T + w J, same rounds), ms, "
        "and the peak memory a later call adds (x J)\n"
    )
    names = [*OURS, *OTHERS]
    print("| m | n | floor ms | " + " | ".join(names) + " | GCond / its floor |")
    print("|---|---|---|" + "---|" * (len(names) + 1))
    skipped: dict[str, str] = {}
    for row in rows:
        m, n = int(row["m"]), int(row["n"])
        cells = []
        for name in names:
            value = row[name]
            if isinstance(value, str):
                skipped.setdefault(name, value)
                cells.append("—")
                continue
            cell = f"{_ratio(value)} ({_ms(float(row[f'{name} ms']))} ms"
            if memory is not None and f"{name} {m} {n}" in memory:
                cell += f", {memory[f'{name} {m} {n}']:.2f} J"
            cells.append(cell + ")")
        cells.append(f"{float(row['GCond / its floor']):.2f}")
        print(f"| {m} | {n:.0e} | {_ms(float(row['floor ms']))} | " + " | ".join(cells) + " |")
    print(
        f"\nMedians of {repeat} rounds, the three calls of a round on three Jacobians in turn. "
        "ExcessMTL computes no Gramian: below 1 where J J^T dominates. GCond's own floor: J copied "
        "into its store of previous rows, J [J; J_prev]^T and w @ J. Memory: at m = 2 an n-long "
        "vector (the output, a temporary) is half of J."
    )
    for name, why in skipped.items():
        print(f"- {name}: {why.removeprefix('not run (').removesuffix(')')}, not run beyond.")
    if memory is None:
        print("- memory: not measured (needs Linux's /proc/self/clear_refs).")
    print("\nTargets (ratio to the floor):\n")
    for name, limit in TARGETS.items():
        at = (64, 128, 256) if limit == 1.5 else tuple(SIZES_M)
        measured = [
            f"{float(row[name]):.2f}"
            for row in rows
            if int(row["m"]) in at and not isinstance(row[name], str)
        ]
        worst = max((float(v) for v in measured), default=float("nan"))
        verdict = "met" if worst <= limit else "not met"
        sizes = "m in {64, 128, 256}" if limit == 1.5 else "every m"
        print(f"- {name} <= {limit} at {sizes}: worst {worst:.2f}, {verdict}")
    print()


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def growth_table(repeat: int, sizes_m: list[int]) -> None:
    """The exponent of time ~ m^a of each method's own stage."""

    print("## Many tasks: growth in m of each method's own stage (ms; fitted exponent)\n")
    stages: dict[str, _Stage] = {
        "GoldenPendulum (weighting on G)": _on_gramian(GoldenPendulumWeighting),
        "AdaptiveGoldenPendulum (weighting on G)": _on_gramian(
            lambda: AdaptiveGoldenPendulumWeighting(loss_ratio_aware=False)
        ),
        "GABA (weighting on G)": _on_gramian(lambda: GABAWeighting(warmup_steps=0)),
        "ExcessMTL (weighting on J)": _on_jacobian(ExcessMTLWeighting),
        "GCond (arbitration loop)": _gcond_loop,
        "golden-pendulum-mtl (QP + PCGrad on rows)": _reference_stage,
        "torchjd UPGrad (weighting on G)": _on_gramian(UPGradWeighting),
        "torchjd PCGrad (weighting on G)": _on_gramian(PCGradWeighting),
    }
    n = 100_000
    print("| stage | " + " | ".join(f"m={m}" for m in sizes_m) + " | exponent in m |")
    print("|---|" + "---|" * (len(sizes_m) + 1))
    for stage, build in stages.items():
        samples: list[tuple[int, float]] = []
        cells = []
        for m in sizes_m:
            if samples and samples[-1][1] > BUDGET_SECONDS:
                cells.append("—")
                continue
            jacobian = conflicting_jacobians(m, n, 1)[0]
            call = build(jacobian)
            call()
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
            if seconds < 0.5:
                seconds = min(seconds, *(_seconds(call) for _ in range(repeat)))
            samples.append((m, seconds))
            cells.append(_ms(1e3 * seconds))
        fitted = [(m, s) for m, s in samples if m >= 32]
        exponent = f"{_slope(fitted):.2f}" if len(fitted) >= 2 else "—"
        print(f"| {stage} | " + " | ".join(cells) + f" | {exponent} |")
    print(
        f"\n(n = {n:.0e} where a stage reads J; the fastest of {repeat} calls; the exponent "
        "fits m >= 32; a stage stops after a call longer than "
        f"{BUDGET_SECONDS:.0f} s)\n"
    )


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _slope(samples: list[tuple[int, float]]) -> float:
    xs = [math.log(m) for m, _ in samples]
    ys = [math.log(s) for _, s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return covariance / sum((x - mean_x) ** 2 for x in xs)


_Stage = Callable[[Tensor], Callable[[], object]]


def _on_gramian(make: Callable[[], Callable[[Tensor], Tensor]]) -> _Stage:
    def build(jacobian: Tensor) -> Callable[[], object]:
        gramian, weighting = jacobian @ jacobian.T, make()
        return lambda: weighting(gramian)

    return build


def _on_jacobian(make: Callable[[], Callable[[Tensor], Tensor]]) -> _Stage:
    def build(jacobian: Tensor) -> Callable[[], object]:
        weighting = make()
        return lambda: weighting(jacobian)

    return build


def _gcond_loop(jacobian: Tensor) -> Callable[[], object]:
    m = jacobian.shape[0]
    weighting = GCondWeighting()
    weighting(jacobian)  # one step, for a previous Jacobian and norm averages
    gramian = jacobian @ jacobian.T
    settings = weighting._settings(m)
    return lambda: resolve_conflicts(
        gramian,
        gramian,
        weighting.previous_norms_sq[:m],
        weighting.norm_ema,
        weighting.winner_history,
        weighting.winner_count,
        settings,
    )


def _reference_stage(jacobian: Tensor) -> Callable[[], object]:
    # In float64: the reference's golden targets overflow float32 from m = 184.
    rows = jacobian.double()
    normalized = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-8)
    gramian = normalized @ normalized.T
    targets = reference_targets(rows.shape[0], dtype=torch.float64)

    def stage() -> object:
        alpha = _solve_golden_qp(gramian, targets)
        return _pcgrad_resolve(normalized, alpha)

    return stage


def precision_table(m: int = 512, n: int = 1000) -> None:
    print(
        f"## Many tasks: largest relative error against float64 on the same rounded input, "
        f"m = {m}, n = {n}, three calls\n"
    )
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    print("| method | " + " | ".join(str(d).removeprefix("torch.") for d in dtypes) + " |")
    print("|---|" + "---|" * len(dtypes))
    generator = torch.Generator().manual_seed(m)
    directions = torch.randn(3, n, generator=generator, dtype=torch.float64)
    steps = []
    for _ in range(3):
        rows = torch.randn(m, 3, generator=generator, dtype=torch.float64) @ directions
        rows += 0.3 * torch.randn(m, n, generator=generator, dtype=torch.float64)
        rows *= 10.0 ** (2.0 * torch.rand(m, 1, generator=generator, dtype=torch.float64) - 1.0)
        steps.append(rows)
    for name, make in OURS.items():
        cells = []
        for dtype in dtypes:
            low, high = make(), make()
            worst = 0.0
            for rows in steps:
                rounded = rows.to(dtype)
                output, expected = low(rounded).double(), high(rounded.double())
                error = float((output - expected).norm() / expected.norm())
                worst = max(worst, error) if math.isfinite(error) else math.inf
            cells.append(f"{worst:.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "\n(Row norms over two decades. ExcessMTL, with its defaults and no warm-up, puts all the "
        "weight on one task here: its output is that task's row, exact in every dtype. GCond's "
        "arbitration branches on comparisons: a pair within rounding of another may be resolved "
        "instead, in any dtype but float64.)\n"
    )


def run(quick: bool, repeat: int) -> None:
    sizes_m = [2, 16, 64, 256] if quick else SIZES_M
    sizes_n = SIZES_N[:1] if quick else SIZES_N
    rows = time_rows(sizes_m, sizes_n, repeat)
    memory = memory_by_size(_sizes(sizes_m, sizes_n))
    print_time_table(rows, memory, repeat)
    growth_table(repeat, [32, 64, 128, 256] if quick else [2, 8, 16, 32, 64, 128, 256, 512])
    precision_table()


if __name__ == "__main__":
    run(quick="--quick" in sys.argv, repeat=3)
