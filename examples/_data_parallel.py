"""
What the multi-process examples share. For ``ddp.py`` and ``fsdp2.py``: a small multi-task
network, its batches, and the run that trains it on ``--processes`` gloo processes (each on its
share of every batch), then on one process on the whole batches, and prints how far apart the two
end (each example gives only how it wraps the network and makes its
:class:`~torchjd_golden.JacobianDescent`). For the trainer examples: a free port, the environment
torchrun gives a process, and the difference of two runs over the whole model.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from torchjd_golden import JacobianDescent

TASKS = ("price", "volume", "risk")


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in TASKS])

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(inputs)
        scales = (100.0, 1.0, 0.01)  # losses of very different magnitudes
        return features, {
            name: scale * (head(features)[:, 0] - targets[:, k]).pow(2).mean()
            for k, (name, scale, head) in enumerate(zip(TASKS, scales, self.heads, strict=True))
        }


# How an example wraps the network (``rank`` None: one process) and makes its step.
MakeStep = Callable[[Network, "int | None", str], tuple[nn.Module, JacobianDescent]]


def train(
    make_step: MakeStep, rank: int | None, processes: int, source: str, steps: int
) -> list[Tensor]:
    """Trains on the whole batches (``rank`` None) or on this rank's share of each."""

    torch.manual_seed(0)
    network = Network()
    model, engine = make_step(network, rank, source)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)  # the same batches in every process
    for _ in range(steps):
        inputs = torch.randn(32 * processes, 10, generator=generator)
        targets = torch.stack([inputs[:, 0], inputs[:, 1] - inputs[:, 0], inputs[:, 2]], dim=1)
        if rank is not None:
            share = slice(rank * 32, (rank + 1) * 32)
            inputs, targets = inputs[share], targets[share]
        features, losses = model(inputs, targets)
        engine.backward(losses, features=features)
        optimizer.step()
        optimizer.zero_grad()
    # An FSDP2 parameter is this rank's shard: gather it whole (a collective on every rank).
    return [getattr(p, "full_tensor", p.detach)().detach().clone() for p in network.parameters()]


def _worker(
    rank: int, make_step: MakeStep, init: str, output: str, processes: int, source: str, steps: int
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=processes)
    try:
        parameters = train(make_step, rank, processes, source, steps)
        if rank == 0:
            torch.save(parameters, output)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def run(description: str, layout: str, make_step: MakeStep) -> None:
    """Parses the example's options, trains both ways and prints the difference."""

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--gramian-from", choices=("parameters", "features"), default="parameters")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "parameters.pt")
        mp.spawn(
            _worker,
            args=(
                make_step, os.path.join(directory, "init"), output, args.processes,
                args.gramian_from, args.steps,
            ),
            nprocs=args.processes,
        )  # fmt: skip
        distributed = torch.load(output, weights_only=True)
    alone = train(make_step, None, args.processes, args.gramian_from, args.steps)
    difference = max(
        float((p - q).abs().max() / q.abs().max()) for p, q in zip(distributed, alone, strict=True)
    )
    print(f"{layout}, gramian_from={args.gramian_from!r}, {args.steps} steps of GABA")
    print(f"processes: {args.processes}, one process: max relative difference {difference:.1e}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def as_torchrun_process(rank: int, processes: int, port: int) -> None:
    """Gives this process the environment torchrun would (gloo on 127.0.0.1)."""

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip


def max_relative_difference(first: list[Tensor], second: list[Tensor]) -> float:
    """Over the whole model: max |a - b| / max |b|."""

    a, b = (torch.cat([t.reshape(-1) for t in tensors]) for tensors in (first, second))
    return float((a - b).abs().max() / b.abs().max())
