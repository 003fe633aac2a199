"""
MultiTaskTrainer with a tiny randomly initialised BERT built from a config (nothing downloaded):
one step equals torchjd by hand, resumption is bit-identical, names reach the aggregator and the
logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torchjd.autojac import jac_to_grad, mtl_backward

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import BertConfig, BertModel, BertPreTrainedModel, TrainingArguments
from transformers.utils import logging as transformers_logging

from torchjd_golden import GCond, aggregator_from_config
from torchjd_golden.integrations.huggingface import AGGREGATOR_STATE_NAME, MultiTaskTrainer

from .._methods import NamedMean

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

TASKS = ("rare_tokens", "first_token", "mean_token")
CONFIG = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=16,
)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


class MultiTaskBert(BertPreTrainedModel):
    """A BERT trunk with one regression head per task; forward returns the losses by name."""

    def __init__(self, config: BertConfig = CONFIG) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.heads = nn.ModuleDict({task: nn.Linear(config.hidden_size, 1) for task in TASKS})
        self.post_init()

    def forward(self, input_ids: Tensor, labels: Tensor) -> dict[str, Any]:
        features = self.bert(input_ids=input_ids).pooler_output
        losses = {
            task: ((head(features)[:, 0] - labels[:, k]) ** 2).mean()
            for k, (task, head) in enumerate(self.heads.items())
        }
        return {"losses": losses, "features": features}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, size: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 50, (size, 12), generator=generator)
        ids = self.ids.float()
        self.labels = torch.stack(
            [(self.ids < 10).float().mean(1), ids[:, 0] / 50, ids.mean(1) / 50], dim=1
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def _train(
    output: Path,
    aggregator: object = "gcond",
    *,
    steps: int = 8,
    accumulate: int = 1,
    resume: Path | None = None,
    size: int = 32,
    config: BertConfig = CONFIG,
    **options: Any,
) -> tuple[MultiTaskBert, MultiTaskTrainer]:
    torch.manual_seed(0)
    model = MultiTaskBert(config)
    arguments = {
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": accumulate,
        "learning_rate": 1e-3,
        "save_strategy": "steps",
        "save_steps": steps // 2,
        "logging_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    } | options
    trainer = MultiTaskTrainer(
        model=model,
        args=TrainingArguments(str(output), **arguments),
        train_dataset=Tokens(size),
        aggregator=aggregator,
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_resumed_run_is_bit_identical(accumulate: int, tmp_path: Path) -> None:
    model, trainer = _train(tmp_path / "whole", accumulate=accumulate)
    halfway = tmp_path / "whole" / "checkpoint-4"
    resumed, again = _train(tmp_path / "resumed", accumulate=accumulate, resume=halfway)

    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    for key, value in trainer.aggregator.state_dict().items():
        assert torch.equal(value, again.aggregator.state_dict()[key]), key
    state = trainer.optimizer.state_dict()["state"]
    for index, values in again.optimizer.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(value, state[index][key]), (index, key)
    saved = torch.load(halfway / AGGREGATOR_STATE_NAME, weights_only=True)
    assert int(saved["weighting.step_count"]) == 4  # one aggregation per optimizer step
    assert int(trainer.aggregator.weighting.step_count) == 8


def test_a_checkpoint_without_the_aggregator_state_is_refused(tmp_path: Path) -> None:
    _train(tmp_path / "whole", steps=2)
    checkpoint = tmp_path / "whole" / "checkpoint-1"
    (checkpoint / AGGREGATOR_STATE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"has no aggregator\.pt"):
        _train(tmp_path / "resumed", steps=2, resume=checkpoint)


def test_one_step_equals_torchjd_by_hand(tmp_path: Path) -> None:
    """Two micro-batches (the whole data set), one GCond call, clipping, one AdamW step."""

    config = BertConfig(**CONFIG.to_dict() | {"hidden_dropout_prob": 0.0})
    config.attention_probs_dropout_prob = 0.0  # no random masks to replay
    model, _ = _train(
        tmp_path,
        steps=1,
        accumulate=2,
        size=16,
        config=config,
        max_grad_norm=0.5,
        lr_scheduler_type="constant",
    )

    torch.manual_seed(0)
    reference = MultiTaskBert(config)
    reference.train()
    data = Tokens(16)
    aggregator = GCond()
    for half in (slice(0, 8), slice(8, 16)):
        output = reference(data.ids[half], data.labels[half])
        losses = torch.stack(list(output["losses"].values())) / 2
        mtl_backward(list(losses.unbind()), features=output["features"], retain_graph=True)
    jac_to_grad([p for p in reference.parameters() if hasattr(p, "jac")], aggregator)
    nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0).step()

    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        # The micro-batches may come in another order: equal up to the order of the sums.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_the_aggregator_gets_the_task_names(tmp_path: Path) -> None:
    aggregator = NamedMean()
    _train(tmp_path, aggregator, steps=4, accumulate=2, save_strategy="no")
    assert aggregator.seen == [TASKS] * 4


def test_a_stateful_aggregator_keys_its_state_by_the_task_names(tmp_path: Path) -> None:
    aggregator = aggregator_from_config("gaba")
    _train(tmp_path, aggregator, steps=2, save_strategy="no")
    assert aggregator.known_tasks == TASKS


def test_the_weights_are_in_the_log_history_and_tensorboard(tmp_path: Path) -> None:
    aggregator = aggregator_from_config("golden_pendulum")
    weights: list[Tensor] = []
    aggregator.gramian_weighting.register_forward_hook(lambda _m, _i, w: weights.append(w))
    _, trainer = _train(
        tmp_path,
        aggregator,
        steps=4,
        save_strategy="no",
        report_to=["tensorboard"],
    )

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [2, 4]
    for log, first, second in zip(logs, weights[::2], weights[1::2], strict=True):
        for k, task in enumerate(TASKS):  # the mean over the steps since the last log
            expected = float(first[k] + second[k]) / 2
            assert log[f"task_weights/weight/{task}"] == pytest.approx(expected, rel=1e-6)
        assert 0.0 < log["task_weights/alpha_balance_ratio"] <= 1.0

    (event_file,) = tmp_path.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/task_weights/weight/{task}" for task in TASKS} <= tags
    logged = [e.value for e in events.Scalars(f"train/task_weights/alpha/{TASKS[0]}")]
    assert logged == pytest.approx([log[f"task_weights/alpha/{TASKS[0]}"] for log in logs])


class Recorder:
    def __init__(self) -> None:
        self.tasks: list[Any] = []

    def record(self, gramian: Tensor, weights: Tensor | None = None, *, tasks: Any = None) -> None:
        assert gramian.shape == (3, 3)
        assert weights is not None
        assert weights.shape == (3,)
        self.tasks.append(tasks)


def test_diagnostics_record_each_step_and_join_the_logs(tmp_path: Path) -> None:
    recorder = Recorder()
    torch.manual_seed(0)
    trainer = MultiTaskTrainer(
        model=MultiTaskBert(CONFIG),
        args=TrainingArguments(
            str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[], use_cpu=True
        ),
        train_dataset=Tokens(),
        aggregator="upgrad",
        diagnostics=recorder,
    )
    trainer.train()
    assert recorder.tasks == [TASKS] * 3

    _, defaults = _train(tmp_path / "default", "upgrad", steps=2, save_strategy="no")
    assert not any(key.startswith("diagnostics/") for key in defaults.state.log_history[0])
    with_diagnostics = MultiTaskTrainer(
        model=MultiTaskBert(CONFIG),
        args=TrainingArguments(
            str(tmp_path / "d"), max_steps=2, logging_steps=1, report_to=[], use_cpu=True
        ),
        train_dataset=Tokens(),
        diagnostics=True,
    )
    with_diagnostics.train()
    first = with_diagnostics.state.log_history[0]
    assert 0.0 <= first["diagnostics/conflict_ratio"] <= 1.0
    assert first["diagnostics/norm_ratio"] >= 1.0


def test_evaluation_reports_the_sum_of_the_task_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MultiTaskBert(CONFIG)
    trainer = MultiTaskTrainer(
        model=model,
        args=TrainingArguments(
            str(tmp_path), per_device_eval_batch_size=32, report_to=[], use_cpu=True
        ),
        eval_dataset=Tokens(),
    )
    metrics = trainer.evaluate()
    data = Tokens()
    model.eval()
    with torch.no_grad():
        expected = sum(model(data.ids, data.labels)["losses"].values())
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
