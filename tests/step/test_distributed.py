"""
Two processes with the gloo backend train with every aggregator: their parameters and aggregator
states stay identical, and equal those of one process training on the concatenated batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import (
    GABA,
    AdaptiveGoldenPendulum,
    ExcessMTL,
    GCond,
    GoldenPendulum,
    sharded_jac_to_grad,
    sync_jacobians,
)

N_STEPS, HALF_BATCH, WORLD_SIZE = 20, 8, 2

# name -> (factory, how the Jacobian is synchronised)
RUNS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "GoldenPendulum": (GoldenPendulum, "sync"),
    "AdaptiveGoldenPendulum": (AdaptiveGoldenPendulum, "sync"),
    "GABA": (lambda: GABA(beta=0.5, warmup_steps=3), "sync"),
    "ExcessMTL": (lambda: ExcessMTL(n_warmup_steps=2), "sync"),
    "GCond": (GCond, "sync"),
    "GoldenPendulum sharded": (GoldenPendulum, "sharded"),
    "GABA sharded": (lambda: GABA(beta=0.5, warmup_steps=3), "sharded"),
    "GCond with DDP": (GCond, "ddp"),
}


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(inputs)
        return features, [head(features)[:, 0] for head in self.heads]


def _batch(step: int) -> tuple[Tensor, Tensor]:
    """The whole batch of a step: both ranks' halves."""

    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(2 * HALF_BATCH, 6, generator=generator)
    targets = torch.stack(
        [10 * inputs[:, 0], -inputs[:, 0] + inputs[:, 1], 0.1 * inputs[:, 2]], dim=1
    ) + 0.1 * torch.randn(2 * HALF_BATCH, 3, generator=generator)
    return inputs, targets


def train(name: str, rank: int | None) -> tuple[list[Tensor], dict[str, Tensor]]:
    """
    Trains with the aggregator ``name``; ``rank`` None is one process on the whole batches,
    otherwise that rank's half of each batch.
    """

    factory, mode = RUNS[name]
    torch.manual_seed(0)
    network = Network()
    model: nn.Module = network
    if mode == "ddp" and rank is not None:
        model = DistributedDataParallel(network)
    aggregator = factory()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)

    for step in range(N_STEPS):
        inputs, targets = _batch(step)
        if rank is not None:
            part = slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH)
            inputs, targets = inputs[part], targets[part]
        if isinstance(model, DistributedDataParallel):
            # torchjd's backward bypasses DDP's reducer: DDP must not wait for it.
            with model.no_sync():
                features, outputs = model(inputs)
        else:
            features, outputs = model(inputs)
        losses = [((o - t) ** 2).mean() for o, t in zip(outputs, targets.T, strict=True)]
        if isinstance(aggregator, AdaptiveGoldenPendulum):
            task_losses = torch.stack(losses).detach()
            if rank is not None:  # its extra input must be the whole batch's too
                dist.all_reduce(task_losses)
                task_losses /= WORLD_SIZE
            aggregator.losses = task_losses
        mtl_backward(losses, features=features)
        if rank is None:
            jac_to_grad(network.trunk.parameters(), aggregator)
        elif mode == "sharded":
            sync_jacobians(network.heads.parameters())
            sharded_jac_to_grad(network.trunk.parameters(), aggregator)  # type: ignore[arg-type]
        else:
            sync_jacobians(network.parameters())
            jac_to_grad(network.trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()

    parameters = [p.detach().clone() for p in network.parameters()]
    return parameters, {k: v.clone() for k, v in aggregator.state_dict().items()}


def _worker(rank: int, init_file: str, output: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.save({name: train(name, rank) for name in RUNS}, Path(output) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[dict[str, tuple[list[Tensor], dict[str, Tensor]]]]:
    directory = tmp_path_factory.mktemp("distributed")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD_SIZE, join=True)
    return [
        torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
    ]


@pytest.mark.parametrize("name", RUNS)
def test_ranks_stay_identical(name: str, ranks: list[dict]) -> None:  # type: ignore[type-arg]
    (parameters_0, state_0), (parameters_1, state_1) = ranks[0][name], ranks[1][name]
    for p, q in zip(parameters_0, parameters_1, strict=True):
        assert torch.equal(p, q)
    assert state_0.keys() == state_1.keys()
    assert bool(state_0) == (not name.startswith("GoldenPendulum"))  # the stateful ones have state
    for key in state_0:
        assert torch.equal(state_0[key], state_1[key]), key


@pytest.mark.parametrize("name", RUNS)
def test_ranks_train_like_one_process_on_the_whole_batch(name: str, ranks: list[dict]) -> None:  # type: ignore[type-arg]
    parameters, state = train(name, rank=None)
    distributed_parameters, distributed_state = ranks[0][name]
    for p, q in zip(distributed_parameters, parameters, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for key, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(distributed_state[key], value, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(distributed_state[key], value), key


def test_without_synchronisation_the_ranks_drift_apart() -> None:
    """Why the helpers exist: each rank aggregating its own Jacobian gives different updates."""

    updates = []
    for rank in range(WORLD_SIZE):
        torch.manual_seed(0)
        network = Network()
        inputs, targets = _batch(0)
        part = slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH)
        features, outputs = network(inputs[part])
        mtl_backward(
            [((o - t) ** 2).mean() for o, t in zip(outputs, targets[part].T, strict=True)],
            features=features,
        )
        jac_to_grad(network.trunk.parameters(), GoldenPendulum())
        updates.append(torch.cat([p.grad.flatten() for p in network.trunk.parameters()]))  # type: ignore[union-attr]
    assert not torch.allclose(updates[0], updates[1])


def test_sharded_needs_a_gramian_weighted_aggregator() -> None:
    with pytest.raises(ValueError, match="GramianWeightedAggregator"):
        sharded_jac_to_grad([torch.ones(2, requires_grad=True)], ExcessMTL())  # type: ignore[arg-type]


def test_sharded_needs_populated_jacobians() -> None:
    with pytest.raises(ValueError, match=r"populated `\.jac`"):
        sharded_jac_to_grad([torch.ones(2, requires_grad=True)], GoldenPendulum())


def test_sharded_on_one_rank_is_jac_to_grad(tmp_path: Path) -> None:
    """With one rank the blocks are the whole Jacobian; ``retain_jac`` keeps the fields."""

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        gradients = []
        for sharded in (False, True):
            torch.manual_seed(0)
            network = Network()
            inputs, targets = _batch(0)
            features, outputs = network(inputs)
            losses = [((o - t) ** 2).mean() for o, t in zip(outputs, targets.T, strict=True)]
            mtl_backward(losses, features=features)
            trunk = list(network.trunk.parameters())
            if sharded:
                weights = sharded_jac_to_grad(trunk, GoldenPendulum(), retain_jac=True)
                assert all(p.jac is not None for p in trunk)  # type: ignore[attr-defined]
            else:
                weights = jac_to_grad(trunk, GoldenPendulum())
            gradients.append((weights, [p.grad for p in trunk]))
    finally:
        dist.destroy_process_group()
    (weights, plain), (sharded_weights, sharded_gradients) = gradients
    torch.testing.assert_close(sharded_weights, weights)
    for p, q in zip(sharded_gradients, plain, strict=True):
        torch.testing.assert_close(p, q)
