"""
The step engine's exactness on two processes: ``JacobianDescent`` under DDP and under FSDP2 (2
gloo processes, each with half of every batch) against one process on the whole batch, for every
aggregator of this package and of torchjd, both sources of the weights, float64 and float32.

Each run trains a small multi-task network (a 2-layer trunk, 3 heads, losses of unequal scales)
for 4 steps of SGD; the table gives the largest relative error, over the steps, of the weights
and of the gradients of every parameter (the whole vector; FSDP2's shards gathered), against the
one-process run with the same aggregator. The issue's targets: 1e-12 in float64, 1e-5 in float32.
"features" is given for the Gramian weightings only (the engine refuses the others).

Run: ``python -m benchmarks.step_exactness``
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torchjd.aggregation import (
    IMTLG,
    MGDA,
    Aggregator,
    AlignedMTL,
    DualProj,
    Mean,
    PCGrad,
    Sum,
    TrimmedMean,
    UPGrad,
)
from torchjd.aggregation import ExcessMTL as TorchjdExcessMTL

from torchjd_golden import (
    GABA,
    AdaptiveGoldenPendulum,
    DynamicK,
    ExcessMTL,
    GCond,
    GoldenPendulum,
    JacobianDescent,
)
from torchjd_golden.step import GramianSource

AGGREGATORS: dict[str, Callable[[], Aggregator]] = {
    "GoldenPendulum": GoldenPendulum,
    "AdaptiveGoldenPendulum": AdaptiveGoldenPendulum,
    "DynamicK": lambda: DynamicK(auto_group=True, regroup_every=2),
    "GABA": GABA,
    "ExcessMTL": lambda: ExcessMTL(n_warmup_steps=1),
    "GCond": GCond,
    "torchjd UPGrad": UPGrad,
    "torchjd MGDA": MGDA,
    "torchjd DualProj": DualProj,
    "torchjd PCGrad": PCGrad,
    "torchjd IMTLG": IMTLG,
    "torchjd AlignedMTL": AlignedMTL,
    "torchjd Mean": Mean,
    "torchjd Sum": Sum,
    "torchjd ExcessMTL": TorchjdExcessMTL,
    "torchjd TrimmedMean": lambda: TrimmedMean(trim_number=1),
}
SOURCES: tuple[GramianSource, ...] = ("parameters", "features")
DTYPES = (torch.float64, torch.float32)
STEPS, BATCH, TASKS = 4, 32, 3


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(TASKS)])

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        features = self.trunk(inputs)
        outputs = torch.cat([head(features) for head in self.heads], dim=1)
        scales = torch.tensor([1.0, 10.0, 0.1], dtype=outputs.dtype)
        return features, scales * (outputs - targets).pow(2).mean(dim=0)


def _gradient(parameter: Tensor) -> Tensor:
    gradient = parameter.grad
    if gradient is None:
        return torch.zeros(parameter.shape, dtype=parameter.dtype)
    full = getattr(gradient, "full_tensor", None)  # an FSDP2 shard: the whole gradient
    return (full() if full is not None else gradient).reshape(-1)


def train(
    name: str, source: GramianSource, dtype: torch.dtype, layout: str, rank: int | None
) -> tuple[list[Tensor | None], list[Tensor]] | None:
    """The weights and the gradients of each step, or ``None`` where the engine refuses."""

    torch.manual_seed(0)
    network = Network().to(dtype)
    model: nn.Module = network
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        model = DistributedDataParallel(network)
    elif layout == "fsdp":
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        for layer in network.trunk:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(network)
    try:
        jd = JacobianDescent(model, AGGREGATORS[name](), shared=network.trunk, gramian_from=source)
    except ValueError:
        return None
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    weights, gradients = [], []
    for _ in range(STEPS):
        inputs = torch.randn(BATCH, 8, generator=generator, dtype=dtype)
        targets = torch.randn(BATCH, TASKS, generator=generator, dtype=dtype)
        if rank is not None:
            half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
            inputs, targets = inputs[half], targets[half]
        features, losses = model(inputs, targets)
        step_weights = jd.backward(losses, features=features)
        weights.append(None if step_weights is None else step_weights.detach().clone())
        gradients.append(torch.cat([_gradient(p) for p in network.parameters()]))
        optimizer.step()
        optimizer.zero_grad()
    return weights, gradients


def _cases() -> list[tuple[str, GramianSource, torch.dtype]]:
    return [(n, s, d) for n in AGGREGATORS for s in SOURCES for d in DTYPES]


def _worker(rank: int, init: str, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        runs = {
            (layout, *case): train(*case, layout=layout, rank=rank)
            for layout in ("ddp", "fsdp")
            for case in _cases()
        }
        if rank == 0:
            torch.save(runs, output)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _relative(mine: list[Tensor | None], expected: list[Tensor | None]) -> float:
    errors = [
        float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))
        for a, b in zip(mine, expected, strict=True)
        if a is not None and b is not None
    ]
    return max(errors, default=float("nan"))


def run() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "runs.pt")
        mp.spawn(_worker, args=(os.path.join(directory, "init"), output), nprocs=2)
        runs = torch.load(output, weights_only=False)
    print(
        "## Two processes against one on the whole batch: largest relative error over "
        f"{STEPS} steps\n"
    )
    print("| aggregator | source | dtype | DDP weights | DDP gradients | FSDP2 weights | FSDP2 "
          "gradients | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    worst = {torch.float64: 0.0, torch.float32: 0.0}
    for name, source, dtype in _cases():
        alone = train(name, source, dtype, layout="local", rank=None)
        if alone is None:
            continue
        cells = []
        for layout in ("ddp", "fsdp"):
            weights, gradients = runs[(layout, name, source, dtype)]
            errors = (_relative(weights, alone[0]), _relative(gradients, alone[1]))  # type: ignore[arg-type]
            worst[dtype] = max(worst[dtype], *(e for e in errors if not math.isnan(e)))
            cells += ["—" if math.isnan(e) else f"{e:.1e}" for e in errors]
        target = "1e-12" if dtype == torch.float64 else "1e-5"
        dtype_name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {source} | {dtype_name} | " + " | ".join(cells) + f" | {target} |")
    print(
        f"\nLargest: float64 {worst[torch.float64]:.1e} (target 1e-12), float32 "
        f"{worst[torch.float32]:.1e} (target 1e-5). — : the aggregator gives no weights.\n"
    )


if __name__ == "__main__":
    run()
