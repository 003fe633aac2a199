"""
Data-parallel training with torchjd-golden: two processes (gloo, CPU) train one model under
DistributedDataParallel, each on its half of every batch, and stay identical (see
docs/guides/ddp.rst).

Run: ``python examples/ddp.py [--steps N]``
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import GABA, ExcessMTL, GoldenPendulum, sharded_jac_to_grad, sync_jacobians

WORLD_SIZE = 2


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 32), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(3)])

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(inputs)
        return features, [head(features)[:, 0] for head in self.heads]


def train(rank: int, aggregator: nn.Module, sharded: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(rank)  # different initialisations: DDP broadcasts rank 0's parameters
    network = Network()
    model = DistributedDataParallel(network)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)  # the same batches on every rank
    for _ in range(steps):
        inputs = torch.randn(2 * 64, 10, generator=generator)
        targets = torch.stack([100 * inputs[:, 0], inputs[:, 1] - inputs[:, 0], inputs[:, 2]], 1)
        half = slice(rank * 64, (rank + 1) * 64)  # this rank's half of the batch
        with model.no_sync():  # torchjd's backward bypasses DDP's gradient hooks
            features, outputs = model(inputs[half])
        losses = [((o - t) ** 2).mean() for o, t in zip(outputs, targets[half].T, strict=True)]
        mtl_backward(losses, features=features)
        if sharded:  # exact, about half the communication, for Gramian-weighted aggregators
            sync_jacobians(network.heads.parameters())
            sharded_jac_to_grad(network.trunk.parameters(), aggregator)
        else:  # any aggregator: every rank aggregates the mean Jacobian
            sync_jacobians(network.parameters())
            jac_to_grad(network.trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()

    checksum = torch.cat([p.detach().flatten() for p in network.parameters()]).sum()
    sums = [torch.zeros(()) for _ in range(WORLD_SIZE)]
    dist.all_gather(sums, checksum)
    return abs(float(sums[0] - sums[1])), float(torch.stack(losses).detach().sum())


def worker(rank: int, init_file: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        runs = [
            ("GoldenPendulum", GoldenPendulum(), False),
            ("GoldenPendulum", GoldenPendulum(), True),
            ("GABA", GABA(warmup_steps=10), False),
            ("GABA", GABA(warmup_steps=10), True),
            ("ExcessMTL", ExcessMTL(), False),
        ]
        if rank == 0:
            print("aggregator       synchronisation   final loss   |rank 0 - rank 1| of parameters")
        for name, aggregator, sharded in runs:
            difference, loss = train(rank, aggregator, sharded, steps)
            if rank == 0:
                how = "sharded_jac_to_grad" if sharded else "sync_jacobians"
                print(f"{name:17s}{how:20s}{loss:10.3f}   {difference:.1e}", flush=True)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(worker, args=(os.path.join(directory, "init"), args.steps), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main()
