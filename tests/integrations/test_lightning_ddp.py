"""
MultiTaskModule under ``Trainer(strategy="ddp", devices=2, accelerator="cpu")`` on two gloo
processes (one start of the two, several checks): a run equals one process on the same global
batches in float64, for both sources of the weights, with accumulation and clipping; the weights
are logged by task name; a run resumed from a checkpoint continues bit-identically on each rank,
the split state of GCond resuming from each rank's own.
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
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

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


def data(processes: int) -> DataLoader:
    """
    32 float64 samples in order, 8 a step: under DDP each rank takes every other one (Lightning's
    own sampler would shuffle them), so that the two ranks' batches make one process's.
    """

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 8, generator=generator, dtype=torch.float64)
    targets = torch.stack([inputs[:, 0], -inputs[:, 0] + inputs[:, 1], 5 * inputs[:, 2]], dim=1)
    dataset = TensorDataset(inputs, targets)
    sampler = DistributedSampler(dataset, shuffle=False) if processes > 1 else None
    return DataLoader(dataset, batch_size=8 // processes, sampler=sampler)


def trainer(epochs: int, processes: int, accumulate: int, clip: float | None) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=processes,
        strategy="ddp" if processes > 1 else "auto",
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(case: str, processes: int, epochs: int = EPOCHS, **fit_options: Any) -> dict[str, Any]:
    """One fit; the final parameters, the last logged weights and the aggregator's state."""

    aggregator, source, accumulate, clip = CASES[case]
    torch.manual_seed(0)
    module = Model(aggregator, gramian_from=source).double()
    run = trainer(epochs, processes, accumulate, clip)
    run.fit(module, data(processes), **fit_options)
    return {
        "parameters": [p.detach().clone() for p in module.parameters()],
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
    runs = {
        case: {k: v for k, v in fit(case, 2).items() if k not in ("trainer", "module")}
        for case in CASES
    }
    checkpoint = Path(directory) / "halfway.ckpt"
    half = fit("gcond parameters", 2, epochs=EPOCHS // 2)
    half["trainer"].save_checkpoint(checkpoint)  # every rank calls it; rank 0 writes
    resumed = fit("gcond parameters", 2, ckpt_path=checkpoint)
    runs["resumed"] = {k: v for k, v in resumed.items() if k not in ("trainer", "module")}
    saved = torch.load(checkpoint, weights_only=True)
    runs["saved states"] = saved["aggregator_states_by_rank"]
    return runs


@pytest.fixture(scope="module")
def two_process_runs() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory:
        return on_ranks(functools.partial(_on_rank, directory))


@pytest.mark.parametrize("case", CASES)
def test_two_processes_fit_as_one_on_the_global_batches(
    case: str, two_process_runs: list[dict[str, Any]]
) -> None:
    expected = fit(case, 1)
    for rank in range(2):
        run = two_process_runs[rank][case]
        # Over the whole model: some entries stay within rounding of zero (relative noise).
        assert relative_error(flat(run["parameters"]), flat(expected["parameters"])) <= 1e-12
        if case != "gcond parameters":  # GCond's update has no weights
            assert set(run["weights"]) == {f"task_weights/weight/{name}" for name in NAMES}
            for key, value in expected["weights"].items():
                assert run["weights"][key] == pytest.approx(value, rel=1e-12)


def test_a_resumed_run_continues_identically_on_each_rank(
    two_process_runs: list[dict[str, Any]],
) -> None:
    widths = []
    for rank in range(2):
        uninterrupted, resumed = (
            two_process_runs[rank][k] for k in ("gcond parameters", "resumed")
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
