"""
MultiTaskTrainer on two gloo processes launched as torchrun launches them (the environment's
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the Trainer wraps the model in
DistributedDataParallel itself), one start of the two for several checks: a run equals one
process on the same global batches in float64, for both sources of the weights, with
accumulation and clipping, and ``diagnostics=True`` records the global Gramian's statistics; the
weights reach the logs by task name; under ``bf16=True`` the ranks stay identical and within
bfloat16's rounding of one process; a run resumed from a checkpoint continues bit-identically on
each rank, from each rank's own aggregator state.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import BertConfig, TrainingArguments
from transformers.utils import logging as transformers_logging

from torchjd_golden.integrations.huggingface import MultiTaskTrainer

from .._asserts import relative_error
from .._spawn import on_ranks
from .._step import flat
from .test_huggingface import CONFIG, TASKS, MultiTaskBert, Tokens

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

GLOBAL_BATCH = 8
# Without dropout: each process draws its own masks, which one process cannot draw alike.
DETERMINISTIC = BertConfig(
    **CONFIG.to_dict() | {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
)
STEPS = 4
# (aggregator, gramian_from, gradient_accumulation_steps)
CASES = {
    "gcond parameters": ("gcond", "parameters", 2),
    "golden_pendulum features": ("golden_pendulum", "features", 1),
}
BF16_CASE = "golden_pendulum features"  # in float32 under bf16=True


class DoubleTokens(Tokens):
    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = super().__getitem__(index)
        return item | {"labels": item["labels"].double()}


def train(
    output: Path, case: str, processes: int, resume: Path | None = None, bf16: bool = False
) -> dict[str, Any]:
    """
    One run in float64 (float32 under ``bf16``); its final parameters, last logged weights,
    aggregator state and diagnostics' history.
    """

    transformers_logging.set_verbosity_error()
    aggregator, source, accumulate = CASES[case]
    torch.manual_seed(0)
    model = MultiTaskBert(DETERMINISTIC)
    model = model if bf16 else model.double()
    arguments = TrainingArguments(
        str(output),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // processes,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=STEPS // 2,
        logging_steps=STEPS,
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        seed=0,
        disable_tqdm=True,
    )
    trainer = MultiTaskTrainer(
        model=model, args=arguments, train_dataset=Tokens(32) if bf16 else DoubleTokens(32),
        aggregator=aggregator, gramian_from=source, diagnostics=True,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    last = next(log for log in reversed(trainer.state.log_history) if "loss" in log)
    return {
        "parameters": [p.detach().clone() for p in model.parameters()],
        "weights": {k: v for k, v in last.items() if k.startswith("task_weights/weight/")},
        "state": {k: v.clone() for k, v in trainer.aggregator.state_dict().items()},
        "diagnostics": trainer.diagnostics.history(),  # type: ignore[union-attr]
    }


def _on_rank(directory: str, rank: int) -> dict[str, Any]:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )  # fmt: skip
    root = Path(directory)
    runs = {case: train(root / case, case, 2) for case in CASES}
    runs["bf16"] = train(root / "bf16", BF16_CASE, 2, bf16=True)
    halfway = root / "gcond parameters" / f"checkpoint-{STEPS // 2}"
    runs["resumed"] = train(root / "resumed", "gcond parameters", 2, resume=halfway)
    runs["files"] = sorted(path.name for path in halfway.glob("aggregator*"))
    return runs


@pytest.fixture(scope="module")
def two_process_runs() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory:
        return on_ranks(functools.partial(_on_rank, directory))


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_as_one_on_the_global_batches(
    case: str, two_process_runs: list[dict[str, Any]], tmp_path: Path
) -> None:
    expected = train(tmp_path, case, 1)
    for rank in range(2):
        run = two_process_runs[rank][case]
        # Over the whole model: some entries stay within rounding of zero (relative noise).
        assert relative_error(flat(run["parameters"]), flat(expected["parameters"])) <= 1e-12
        if case != "gcond parameters":  # GCond's update has no weights
            assert set(run["weights"]) == {f"task_weights/weight/{task}" for task in TASKS}
            for key, value in expected["weights"].items():
                assert run["weights"][key] == pytest.approx(value, rel=1e-12)
        # diagnostics=True: the statistics of the global Gramian at every step, not this rank's
        assert run["diagnostics"].keys() == expected["diagnostics"].keys()
        for key, history in expected["diagnostics"].items():
            assert len(history) == len(run["diagnostics"][key]) == STEPS
            assert relative_error(run["diagnostics"][key], history) <= 1e-12, key


def test_bf16_ranks_step_alike_and_as_one_process(
    two_process_runs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """
    Under ``bf16=True`` (float32 parameters, bfloat16 autocast): both ranks hold the same
    parameters and weights, and one process on the global batches differs only by the rounding
    of the bfloat16 forward, which splitting the batch changes.
    """

    first, second = (two_process_runs[rank]["bf16"] for rank in range(2))
    for mine, other in zip(first["parameters"], second["parameters"], strict=True):
        assert torch.equal(mine, other)
    assert first["weights"] == second["weights"]
    expected = train(tmp_path, BF16_CASE, 1, bf16=True)
    # Every parameter trained: Accelerate's cast of the outputs to float32 would take the
    # features off the losses' path, and the trunk would not move.
    torch.manual_seed(0)
    initial = list(MultiTaskBert(DETERMINISTIC).parameters())
    for run in (first, expected):
        assert all(not torch.equal(p, q) for p, q in zip(run["parameters"], initial, strict=True))
    # Half batches round the bfloat16 forward differently: each step's weights and update move
    # by a fraction of one bfloat16 rounding, and Adam's normalised steps keep the sum over
    # this run's 4 steps below one rounding.
    tolerance = torch.finfo(torch.bfloat16).eps
    assert relative_error(flat(first["parameters"]), flat(expected["parameters"])) <= tolerance
    for key, value in expected["weights"].items():
        assert first["weights"][key] == pytest.approx(value, rel=tolerance)


def test_a_resumed_run_continues_identically_on_each_rank(
    two_process_runs: list[dict[str, Any]],
) -> None:
    assert two_process_runs[0]["files"] == ["aggregator_0.pt", "aggregator_1.pt"]
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
    assert widths[0] + widths[1] > max(widths)  # each rank its own block of the columns
