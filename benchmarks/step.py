"""
The step engine (``JacobianDescent``) against a plain single-objective step and torchjd's autojac
step with the same aggregator (Golden Pendulum), at m = 2, 8 and 32 tasks, on two models: the MLP
of ``training_step.py`` (256 -> 1024 -> 1024, batch 128) and a trunk-dominated one (a 4-layer
transformer encoder, d = 128, 32 tokens, batch 32, mean-pooled, one linear head per task). Then
DDP and FSDP2 on 2 gloo processes, each against its own plain step, with the collectives each
step issues (counted by wrapping ``torch.distributed``'s functions; DDP's bucketed all-reduce runs
in its C++ reducer and is given from the model's size).

Every ratio is measured in the same run, from medians over interleaved rounds. Exactness against
one process, every aggregator: ``python -m benchmarks.step_exactness``.
``python -m benchmarks --sections engine [--quick]``.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GoldenPendulum
from torchjd_golden.step import GramianSource, JacobianDescent

from .gcond import interleaved_medians

TASK_COUNTS = (2, 8, 32)


class MultiTask(nn.Module):
    """
    A trunk and ``m`` linear heads; ``forward`` gives the features and the ``m`` losses, one per
    head (as ``training_step.py``'s network: each loss's graph above the features is its head).
    """

    def __init__(self, trunk: nn.Module, width: int, m: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(m)])
        self.register_buffer("scales", torch.logspace(-1, 2, m))

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(inputs)
        return features, [
            scale * (head(features)[:, 0] - targets[:, k]).pow(2).mean()
            for k, (scale, head) in enumerate(zip(self.scales, self.heads, strict=True))
        ]


class MeanPooled(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, inputs: Tensor) -> Tensor:
        return self.encoder(inputs).mean(dim=1)


def mlp(m: int) -> tuple[MultiTask, tuple[Tensor, Tensor]]:
    trunk = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU())
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(128, 256, generator=generator), torch.randn(128, m, generator=generator))
    return MultiTask(trunk, 1024, m), data


def transformer(m: int) -> tuple[MultiTask, tuple[Tensor, Tensor]]:
    layer = nn.TransformerEncoderLayer(
        d_model=128, nhead=4, dim_feedforward=512, dropout=0.0, batch_first=True
    )
    trunk = MeanPooled(nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False))
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 32, 128, generator=generator), torch.randn(32, m, generator=generator))
    return MultiTask(trunk, 128, m), data


MODELS: dict[str, Callable[[int], tuple[MultiTask, tuple[Tensor, Tensor]]]] = {
    "MLP": mlp,
    "transformer": transformer,
}


def _fresh(model_name: str, m: int) -> tuple[MultiTask, tuple[Tensor, Tensor], torch.optim.SGD]:
    torch.manual_seed(0)
    model, data = MODELS[model_name](m)
    return model, data, torch.optim.SGD(model.parameters(), lr=1e-5)


def plain_step(model_name: str, m: int) -> Callable[[], object]:
    model, data, optimizer = _fresh(model_name, m)

    def step() -> None:
        _, losses = model(*data)
        torch.stack(losses).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def autojac_step(model_name: str, m: int) -> Callable[[], object]:
    model, data, optimizer = _fresh(model_name, m)
    aggregator = GoldenPendulum()

    def step() -> None:
        features, losses = model(*data)
        mtl_backward(losses, features=features)
        jac_to_grad(list(model.trunk.parameters()), aggregator)
        optimizer.step()
        optimizer.zero_grad()

    return step


def engine_step(model_name: str, m: int, source: GramianSource) -> Callable[[], object]:
    model, data, optimizer = _fresh(model_name, m)
    engine = JacobianDescent(model, GoldenPendulum(), shared=model.trunk, gramian_from=source)

    def step() -> None:
        features, losses = model(*data)
        engine.backward(losses, features=features)
        optimizer.step()
        optimizer.zero_grad()

    return step


def one_process_table(repeat: int, task_counts: tuple[int, ...] = TASK_COUNTS) -> None:
    print("## One process: a step of the engine against a plain step and torchjd's autojac\n")
    print(
        "| model | m | plain (ms) | autojac (ms) | parameters (ms) | features (ms) | "
        "parameters / autojac | features / plain | autojac / plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name in MODELS:
        for m in task_counts:
            timings = interleaved_medians(
                {
                    "plain": plain_step(model_name, m),
                    "autojac": autojac_step(model_name, m),
                    "parameters": engine_step(model_name, m, "parameters"),
                    "features": engine_step(model_name, m, "features"),
                },
                repeat,
            )
            ms = {name: 1e3 * seconds for name, seconds in timings.items()}
            print(
                f"| {model_name} | {m} | {ms['plain']:.1f} | {ms['autojac']:.1f} | "
                f"{ms['parameters']:.1f} | {ms['features']:.1f} | "
                f"{ms['parameters'] / ms['autojac']:.2f} | {ms['features'] / ms['plain']:.2f} | "
                f"{ms['autojac'] / ms['plain']:.2f} |"
            )
    print(
        "\nTargets: `features` at most 1.5x the plain step at m = 8 and 32 on the transformer, "
        "2x on the MLP; `parameters` at most 1.05x torchjd's autojac step (both Golden Pendulum, "
        "GoldenPendulum's QP and PCGrad included).\n"
    )


# -- two processes --------------------------------------------------------------------------------

# Each collective, and the position of the tensor (or list of tensors) it sends from this rank.
_COUNTED = {
    "all_reduce": 0,
    "broadcast": 0,
    "reduce_scatter": 1,
    "reduce_scatter_tensor": 1,
    "reduce_scatter_single": 1,
    "all_gather": 1,
    "all_gather_into_tensor": 1,
    "all_gather_single": 1,
}


@contextmanager
def counted_collectives(counts: Counter[str]) -> Iterator[None]:
    """
    Counts the calls of ``torch.distributed``'s collectives made from Python (FSDP2's included)
    and the bytes each hands over from this rank.
    """

    originals = {name: getattr(dist, name) for name in _COUNTED}

    def wrap(name: str) -> Callable[..., Any]:
        original, position = originals[name], _COUNTED[name]

        def counting(*args: Any, **kwargs: Any) -> Any:
            counts["calls"] += 1
            counts["bytes"] += _bytes(args[position]) if len(args) > position else 0
            return original(*args, **kwargs)

        return counting

    for name in _COUNTED:
        setattr(dist, name, wrap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _bytes(value: object) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_bytes(v) for v in value)
    return 0


def _distributed_steps(
    layout: str, m: int, rank: int
) -> tuple[dict[str, Callable[[], object]], int]:
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    def build() -> tuple[nn.Module, MultiTask, tuple[Tensor, Tensor], torch.optim.SGD]:
        torch.manual_seed(0)
        network, (inputs, targets) = mlp(m)
        half = slice(rank * 64, (rank + 1) * 64)
        data = (inputs[half], targets[half])
        if layout == "ddp":
            model: nn.Module = DistributedDataParallel(network)
        else:
            for layer in network.trunk:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(network)
            model = network
        return model, network, data, torch.optim.SGD(network.parameters(), lr=1e-5)

    def plain() -> Callable[[], object]:
        model, _, data, optimizer = build()

        def step() -> None:
            _, losses = model(*data)
            torch.stack(losses).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    def per_task_floor() -> Callable[[], object]:
        model, _, data, optimizer = build()

        def step() -> None:  # m plain backward passes: the exact step's floor under FSDP2
            _, losses = model(*data)
            for k in range(m):
                losses[k].backward(retain_graph=k < m - 1)
            optimizer.step()
            optimizer.zero_grad()

        return step

    def engine(source: GramianSource) -> Callable[[], object]:
        model, network, data, optimizer = build()
        jd = JacobianDescent(model, GoldenPendulum(), shared=network.trunk, gramian_from=source)

        def step() -> None:
            features, losses = model(*data)
            jd.backward(losses, features=features)
            optimizer.step()
            optimizer.zero_grad()

        return step

    steps = {"plain": plain(), "parameters": engine("parameters"), "features": engine("features")}
    if layout == "fsdp":
        steps["m plain backward passes"] = per_task_floor()
    n = sum(p.numel() for p in mlp(m)[0].parameters())
    return steps, n


def _worker(rank: int, init: str, output: str, repeat: int, task_counts: tuple[int, ...]) -> None:
    torch.set_num_threads(1)  # two processes on a shared CPU: one thread each
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    rows = []
    try:
        for layout in ("ddp", "fsdp"):
            for m in task_counts:
                steps, n = _distributed_steps(layout, m, rank)
                timings = interleaved_medians(steps, repeat)
                traffic = {}
                for name, step in steps.items():
                    counts: Counter[str] = Counter()
                    with counted_collectives(counts):
                        step()
                    traffic[name] = counts
                rows.append((layout, m, n, timings, traffic))
        if rank == 0:
            torch.save(rows, output)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _traffic(counts: Counter[str]) -> str:
    return f"{counts['calls']} / {counts['bytes'] / 1e6:.2f} MB"


def two_process_table(repeat: int, task_counts: tuple[int, ...] = (2, 8)) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "rows.pt")
        mp.spawn(
            _worker,
            args=(os.path.join(directory, "init"), output, repeat, task_counts),
            nprocs=2,
        )
        rows = torch.load(output, weights_only=False)
    print("## Two processes (gloo, one thread each): the MLP, batch 64 per rank\n")
    print(
        "| layout | m | step | ms | / plain step | collectives from Python per step (calls / "
        "bytes sent) |"
    )
    print("|---|---|---|---|---|---|")
    for layout, m, n, timings, traffic in rows:
        for name, seconds in timings.items():
            ratio = seconds / timings["plain"]
            counted = _traffic(traffic[name])
            if layout == "ddp" and name in ("plain", "features"):
                counted += f" + DDP's all-reduce of {n * 4 / 1e6:.2f} MB"
            print(f"| {layout} | {m} | {name} | {1e3 * seconds:.1f} | {ratio:.2f} | {counted} |")
    floor_rows = [
        (m, t["parameters"] / t["m plain backward passes"])
        for layout, m, _, t, _ in rows
        if layout == "fsdp"
    ]
    print(
        "\nTarget: FSDP2 `parameters` at most 1.2x `m plain backward passes` per step ("
        + ", ".join(f"m = {m}: {ratio:.2f}x" for m, ratio in floor_rows)
        + ").\n"
    )


def run(quick: bool) -> None:
    repeat = 5 if quick else 15
    one_process_table(repeat, (2, 8) if quick else TASK_COUNTS)
    two_process_table(repeat, (2,) if quick else (2, 8))
