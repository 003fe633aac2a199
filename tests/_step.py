"""
A small multi-task model and the runs of the step engine's tests: one process on the whole
batches, or one rank of a DDP or FSDP2 group on its half of each.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
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

from torchjd_golden import ConflictMonitor
from torchjd_golden.step import GramianSource, JacobianDescent

from ._methods import AGGREGATORS

Layout = Literal["local", "ddp", "fsdp"]

TASKS = ("depth", "normals", "edges")
SCALES = (1.0, 4.0, 0.25)  # losses of unequal magnitudes
BATCH, STEPS = 16, 3


class Network(nn.Module):
    """A trunk and one linear head per task; ``forward`` returns the features and the losses."""

    def __init__(self, dropout: float = 0.0, checkpointed: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(5, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 8), nn.Tanh()
        )
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS])
        self.checkpointed = checkpointed

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.checkpointed:
            features = torch.utils.checkpoint.checkpoint(self.trunk, inputs, use_reentrant=False)
        else:
            features = self.trunk(inputs)
        losses = [
            scale * (head(features)[:, 0] - targets[:, k]).pow(2).mean()
            for k, (scale, head) in enumerate(zip(SCALES, self.heads, strict=True))
        ]
        return features, torch.stack(losses)


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The whole batch of a step (both ranks' halves), the same in every process."""

    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(BATCH, 5, generator=generator, dtype=dtype)
    targets = torch.stack(
        [inputs[:, 0], inputs[:, 1] - inputs[:, 0], torch.tanh(inputs[:, 2])], dim=1
    ) + 0.1 * torch.randn(BATCH, len(TASKS), generator=generator, dtype=dtype)
    return inputs, targets


def half(tensor: Tensor, rank: int | None) -> Tensor:
    """This rank's half of a batch (all of it for one process)."""

    if rank is None:
        return tensor
    size = tensor.shape[0] // 2
    return tensor[rank * size : (rank + 1) * size]


_TORCHJD: dict[str, Callable[[], Aggregator]] = {
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
FACTORIES: dict[str, Callable[[], Aggregator]] = {
    **{method.name: method.make for method in AGGREGATORS},  # type: ignore[misc]
    **_TORCHJD,
}


def takes_gramian(name: str) -> bool:
    """Whether the aggregator ``name`` weights the Gramian only (so it can weight features)."""

    from torchjd_golden.step._sharded import gramian_weighting_of  # noqa: PLC0415

    return gramian_weighting_of(FACTORIES[name]()) is not None


@dataclass
class Run:
    """What a run leaves: the final parameters (whole), each step's weights, the state."""

    parameters: list[Tensor]
    weights: list[Tensor | None]
    gradients: list[Tensor]
    state: dict[str, Any]
    norms: list[list[float]] = field(default_factory=list)  # the attached monitor's, per step


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def whole(tensor: Tensor) -> Tensor:
    """A parameter or gradient in full (an FSDP2 DTensor gathered; a collective)."""

    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach().clone()


def train(
    name: str,
    source: GramianSource,
    *,
    layout: Layout = "local",
    rank: int | None = None,
    dtype: torch.dtype = torch.float64,
    steps: int = STEPS,
) -> Run:
    """Trains with aggregator ``name`` through a :class:`JacobianDescent` of ``layout``."""

    torch.manual_seed(0)
    network = Network().to(dtype)
    model = wrapped(network, layout)
    aggregator = FACTORIES[name]()
    monitor = ConflictMonitor()  # a hook on the weighting: it sees the whole batch's Gramian
    monitor.attach(aggregator)
    engine = JacobianDescent(model, aggregator, shared=network.trunk, gramian_from=source)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    weights, gradients, norms = [], [], []
    for step in range(steps):
        inputs, targets = batch(step, dtype)
        features, losses = model(half(inputs, rank), half(targets, rank))
        named = dict(zip(TASKS, losses.unbind(), strict=True))
        result = engine.backward(named, features=features)
        weights.append(None if result is None else result.detach().clone())
        gradients.append(flat([whole(p.grad) for p in network.parameters()]))  # type: ignore[arg-type]
        norms.append(list(monitor.report().gradient_norms.values()))
        optimizer.step()
        optimizer.zero_grad()
    return Run(
        parameters=[whole(p) for p in network.parameters()],
        weights=weights,
        gradients=gradients,
        state={k: v.clone() for k, v in aggregator.state_dict().items()},
        norms=norms,
    )


def wrapped(network: nn.Module, layout: Layout) -> nn.Module:
    """The network as ``layout`` runs it (call inside a process group for DDP and FSDP2)."""

    if layout == "ddp":
        return DistributedDataParallel(network)
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        for layer in network.trunk:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        for head in network.heads:
            fully_shard(head)
        fully_shard(network)
    return network


def resumed(name: str, *, layout: Layout, rank: int | None, steps: int = 4) -> tuple[Run, Run]:
    """
    Two runs of ``steps`` steps: one uninterrupted, one whose aggregator (and engine) is replaced
    half-way by a fresh one loaded with this rank's ``state_dict`` of the first, through
    ``torch.save`` and ``torch.load(weights_only=True)``.
    """

    runs = []
    for restart in (None, steps // 2):
        torch.manual_seed(0)
        network = Network().double()
        model = wrapped(network, layout)
        aggregator = FACTORIES[name]()
        engine = JacobianDescent(model, aggregator, shared=network.trunk)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
        gradients = []
        for step in range(steps):
            if step == restart:
                buffer = io.BytesIO()
                torch.save(aggregator.state_dict(), buffer)
                buffer.seek(0)
                aggregator = FACTORIES[name]()
                aggregator.load_state_dict(torch.load(buffer, weights_only=True))
                engine = JacobianDescent(model, aggregator, shared=network.trunk)
            inputs, targets = batch(step)
            features, losses = model(half(inputs, rank), half(targets, rank))
            engine.backward(losses, features=features)
            gradients.append(flat([whole(p.grad) for p in network.parameters()]))  # type: ignore[arg-type]
            optimizer.step()
            optimizer.zero_grad()
        state = {k: v.clone() for k, v in aggregator.state_dict().items()}
        runs.append(Run([whole(p) for p in network.parameters()], [], gradients, state))
    return runs[0], runs[1]
