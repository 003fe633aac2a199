"""
A tiny randomly initialised BERT (built from a config: nothing is downloaded) with three
regression heads, trained by the Hugging Face ``Trainer`` with a stateful aggregator, checkpointed
halfway, resumed from that checkpoint in a new Trainer, and compared with the uninterrupted run:
parameters, optimizer state and aggregator state must be bit-identical.

Run: ``python examples/huggingface_trainer.py [--steps N] [--output DIR] [--aggregator NAME]
[--accumulate K]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel, BertPreTrainedModel, TrainingArguments
from transformers.utils import logging as transformers_logging

from torchjd_golden.integrations.huggingface import MultiTaskTrainer

TASKS = ("rare_tokens", "first_token", "mean_token")


class MultiTaskBert(BertPreTrainedModel):
    """A BERT trunk and one regression head per task; forward returns the losses by name."""

    def __init__(self, config: BertConfig) -> None:
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
        return {"losses": losses, "features": features}  # features: torchjd's mtl_backward


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the targets are three statistics of the tokens."""

    def __init__(self, size: int) -> None:
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


CONFIG = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=16,
)


def train(
    output: Path, aggregator: str, steps: int, accumulate: int, resume: Path | None = None
) -> tuple[MultiTaskBert, MultiTaskTrainer]:
    torch.manual_seed(0)
    model = MultiTaskBert(CONFIG)
    arguments = TrainingArguments(
        str(output),
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=max(steps // 2, 1),
        logging_steps=max(steps // 2, 1),
        report_to="none",  # the weights are read from log_history; TensorBoard needs its extra
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = MultiTaskTrainer(
        model=model, args=arguments, train_dataset=Tokens(64), aggregator=aggregator
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps in all")
    parser.add_argument("--output", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--aggregator", default="gcond", help="a name for aggregator_from_config")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    output = args.output or Path(tempfile.mkdtemp())
    steps = max(args.steps, 2)

    model, trainer = train(output / "uninterrupted", args.aggregator, steps, args.accumulate)
    halfway = output / "uninterrupted" / f"checkpoint-{steps // 2}"
    resumed, again = train(output / "resumed", args.aggregator, steps, args.accumulate, halfway)

    same_parameters = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True)
    )
    states = (trainer.aggregator.state_dict(), again.aggregator.state_dict())
    same_aggregator = all(torch.equal(value, states[1][key]) for key, value in states[0].items())
    optimizers = [t.optimizer.state_dict()["state"] for t in (trainer, again)]
    same_optimizer = all(
        torch.equal(value, optimizers[1][index][key])
        for index, state in optimizers[0].items()
        for key, value in state.items()
    )
    last = next(log for log in reversed(trainer.state.log_history) if "loss" in log)
    weights = {
        key.removeprefix("task_weights/weight/"): round(value, 4)
        for key, value in last.items()
        if key.startswith("task_weights/weight/")
    }
    print(f"aggregator: {trainer.aggregator!r}")
    print(f"optimizer steps: {trainer.state.global_step}, accumulation: {args.accumulate}")
    print(f"checkpoint: {', '.join(sorted(p.name for p in halfway.iterdir()))}")
    print(f"task weights in the last log: {weights}")
    print(f"parameters {same_parameters}, optimizer {same_optimizer}, aggregator {same_aggregator}")
    if same_parameters and same_optimizer and same_aggregator:
        print("resume: identical")
    else:
        print("resume: DIFFERENT")
        sys.exit(1)


if __name__ == "__main__":
    main()
