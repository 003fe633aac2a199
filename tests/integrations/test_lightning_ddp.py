"""
MultiTaskModule on two gloo processes, under ``Trainer(strategy="ddp", devices=2,
accelerator="cpu")`` and under Lightning's FSDP2 path (``ModelParallelStrategy``, each layer
``fully_shard``-ed in ``configure_model``, the trunk named as ``shared``), one start of the two
for several checks: a run equals one process on the same global batches in float64, for both
sources of the weights, with accumulation and clipping, and ``diagnostics=True`` records the
global Gramian's statistics; the weights are logged by task name; ``precision="bf16-mixed"``
keeps the ranks identical and within bfloat16's rounding of one process; a run resumed from a
checkpoint continues bit-identically on each rank, the split state of GCond resuming from each
rank's own.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchjd_golden import ConflictMonitor

from .._asserts import relative_error
from .._spawn import on_ranks
from .._step import flat
from .test_lightning import NAMES, Model

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

# (aggregator, gramian_from, accumulate_grad_batches, gradient_clip_val)
CASES = {
    "gcond parameters": ("gcond", "parameters", 2, 0.5),
    "golden_pendulum features": ("golden_pendulum", "features", 2, 0.5),
    "upgrad parameters": ("upgrad", "parameters", 1, None),
}
EPOCHS = 2
FSDP2_CASES = ("gcond parameters", "golden_pendulum features")
BF16_CASE = "golden_pendulum features"  # in float32 under precision="bf16-mixed"


class ShardedModel(Model):
    """The same model, each layer fully sharded over the data-parallel mesh (FSDP2)."""

    def configure_model(self) -> None:
        if self.device_mesh is None:  # one process: nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.trunk, *self.heads.values()):
            fully_shard(layer, mesh=mesh)


def data(processes: int, dtype: torch.dtype = torch.float64) -> DataLoader:
    """
    32 samples in order, 8 a step: under DDP each rank takes every other one (Lightning's own
    sampler would shuffle them), so that the two ranks' batches make one process's.
    """

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 8, generator=generator, dtype=dtype)
    targets = torch.stack([inputs[:, 0], -inputs[:, 0] + inputs[:, 1], 5 * inputs[:, 2]], dim=1)
    dataset = TensorDataset(inputs, targets)
    sampler = DistributedSampler(dataset, shuffle=False) if processes > 1 else None
    return DataLoader(dataset, batch_size=8 // processes, sampler=sampler)


def trainer(
    epochs: int, processes: int, accumulate: int, clip: float | None, strategy: str, precision: Any
) -> Trainer:
    if processes == 1:
        chosen: Any = "auto"
    elif strategy == "fsdp2":
        chosen = ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)
    else:
        chosen = strategy
    return Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=chosen,
        precision=precision,
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(
    case: str,
    processes: int,
    epochs: int = EPOCHS,
    strategy: str = "ddp",
    precision: Any = None,
    **fit_options: Any,
) -> dict[str, Any]:
    """
    One fit; the final parameters (gathered whole under FSDP2), the last logged weights, the
    aggregator's state and the diagnostics' history.
    """

    aggregator, source, accumulate, clip = CASES[case]
    torch.manual_seed(0)
    if strategy == "fsdp2" and processes > 1:  # FSDP2 needs the shared parameters named
        module: Model = ShardedModel(
            aggregator, gramian_from=source, diagnostics=True, shared="trunk"
        )
    else:
        module = Model(aggregator, gramian_from=source, diagnostics=True)
    dtype = torch.float32 if precision is not None else torch.float64
    module = module.to(dtype)
    run = trainer(epochs, processes, accumulate, clip, strategy, precision)
    run.fit(module, data(processes, dtype), **fit_options)
    assert isinstance(module.diagnostics, ConflictMonitor)
    return {
        "parameters": [
            (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for p in module.parameters()
        ],
        "diagnostics": module.diagnostics.history(),
        "layout": module._jacobian_step.engine.layout,  # type: ignore[union-attr]
        "weights": {
            key: float(value)
            for key, value in run.callback_metrics.items()
            if key.startswith("task_weights/weight/")
        },
        "state": {k: v.clone() for k, v in module.aggregator.state_dict().items()},
        "trainer": run,
        "module": module,
    }


def _on_rank(directory: str, rank: int) -> dict[str, Any]:
    """What each rank returns: every case's run, and the resumed run of GCond."""

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # As torchrun sets them: Lightning then joins the group these processes already form.
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
    )  # fmt: skip
    runs = {("ddp", case): _kept(fit(case, 2)) for case in CASES}
    runs |= {("fsdp2", case): _kept(fit(case, 2, strategy="fsdp2")) for case in FSDP2_CASES}
    runs["bf16"] = _kept(fit(BF16_CASE, 2, precision="bf16-mixed"))
    checkpoint = Path(directory) / "halfway.ckpt"
    half = fit("gcond parameters", 2, epochs=EPOCHS // 2)
    half["trainer"].save_checkpoint(checkpoint)  # every rank calls it; rank 0 writes
    runs["resumed"] = _kept(fit("gcond parameters", 2, ckpt_path=checkpoint))
    saved = torch.load(checkpoint, weights_only=True)
    runs["saved states"] = saved["aggregator_states_by_rank"]
    sharded = Path(directory) / "fsdp2.ckpt"  # a folder: each rank writes its shards
    half = fit("gcond parameters", 2, epochs=EPOCHS // 2, strategy="fsdp2")
    half["trainer"].save_checkpoint(sharded)
    runs["fsdp2 resumed"] = _kept(fit("gcond parameters", 2, strategy="fsdp2", ckpt_path=sharded))
    return runs


def _kept(run: dict[str, Any]) -> dict[str, Any]:
    """What a rank sends back of a fit (not its Trainer and module)."""
    return {k: v for k, v in run.items() if k not in ("trainer", "module")}


@pytest.fixture(scope="module")
def two_process_runs() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory:
        return on_ranks(functools.partial(_on_rank, directory))


@pytest.mark.parametrize(
    ("strategy", "case"),
    [*(("ddp", case) for case in CASES), *(("fsdp2", case) for case in FSDP2_CASES)],
)
def test_two_processes_fit_as_one_on_the_global_batches(
    strategy: str, case: str, two_process_runs: list[dict[str, Any]]
) -> None:
    expected = fit(case, 1)
    for rank in range(2):
        run = two_process_runs[rank][strategy, case]
        assert run["layout"] == strategy.removesuffix("2")  # the engine's path: "ddp" or "fsdp"
        # Over the whole model: some entries stay within rounding of zero (relative noise).
        assert relative_error(flat(run["parameters"]), flat(expected["parameters"])) <= 1e-12
        if case != "gcond parameters":  # GCond's update has no weights
            assert set(run["weights"]) == {f"task_weights/weight/{name}" for name in NAMES}
            for key, value in expected["weights"].items():
                assert run["weights"][key] == pytest.approx(value, rel=1e-12)
        # diagnostics=True: the statistics of the global Gramian at every step, not this rank's
        assert run["diagnostics"].keys() == expected["diagnostics"].keys()
        for key, history in expected["diagnostics"].items():
            assert len(history) == len(run["diagnostics"][key]) > 0
            assert relative_error(run["diagnostics"][key], history) <= 1e-12, key


def test_bf16_mixed_ranks_step_alike_and_as_one_process(
    two_process_runs: list[dict[str, Any]],
) -> None:
    """
    Under ``precision="bf16-mixed"`` (float32 parameters, bfloat16 forward): both ranks hold the
    same parameters and weights, and one process on the global batches differs only by the
    rounding of the bfloat16 forward, which splitting the batch changes.
    """

    first, second = (two_process_runs[rank]["bf16"] for rank in range(2))
    for mine, other in zip(first["parameters"], second["parameters"], strict=True):
        assert torch.equal(mine, other)
    assert first["weights"] == second["weights"]
    expected = fit(BF16_CASE, 1, precision="bf16-mixed")
    # Half batches round the bfloat16 forward differently (the losses' means, the Gramian's
    # products): each step's weights and update move by a fraction of one bfloat16 rounding,
    # and Adam's normalised steps keep the sum over this run's 8 steps below one rounding.
    tolerance = torch.finfo(torch.bfloat16).eps
    assert relative_error(flat(first["parameters"]), flat(expected["parameters"])) <= tolerance
    for key, value in expected["weights"].items():
        assert first["weights"][key] == pytest.approx(value, rel=tolerance)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_resumed_run_continues_identically_on_each_rank(
    strategy: str, two_process_runs: list[dict[str, Any]]
) -> None:
    widths = []
    resumed_key = "resumed" if strategy == "ddp" else "fsdp2 resumed"
    for rank in range(2):
        uninterrupted, resumed = (
            two_process_runs[rank][k] for k in ((strategy, "gcond parameters"), resumed_key)
        )
        for mine, expected in zip(resumed["parameters"], uninterrupted["parameters"], strict=True):
            assert torch.equal(mine, expected)
        for key, value in uninterrupted["state"].items():
            assert torch.equal(resumed["state"][key], value), key
        widths.append(uninterrupted["state"]["momentum"].shape[-1])
        assert two_process_runs[0]["saved states"][rank].keys() == uninterrupted["state"].keys()
    trunk = sum(p.numel() for p in Model().trunk.parameters())
    assert sum(widths) == trunk  # each rank its own block of the columns
    assert max(widths) < trunk


def test_a_checkpoint_of_two_processes_is_refused_on_one(
    two_process_runs: list[dict[str, Any]], tmp_path: Path
) -> None:
    checkpoint = {
        "state_dict": {},
        "aggregator_states_by_rank": two_process_runs[0]["saved states"],
    }
    with pytest.raises(ValueError, match="aggregator states of 2 processes; this run has 1"):
        Model("gcond").on_load_checkpoint(checkpoint)
