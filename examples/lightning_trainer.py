"""
A multi-task LightningModule trained by Jacobian descent with a stateful aggregator, checkpointed
halfway, resumed in a fresh process-like setting (new module, new Trainer), and compared with an
uninterrupted run: parameters, optimizer state and aggregator state must be bit-identical.

Run: ``python examples/lightning_trainer.py [--steps N] [--output DIR] [--aggregator NAME]
[--accumulate K]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from lightning import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torchjd_golden.integrations.lightning import MultiTaskModule, TaskLosses

TASKS = ("position", "difference", "scaled")


class MultiTask(MultiTaskModule):
    """A shared trunk and one head per task; the aggregator is named in the hyper-parameters."""

    def __init__(self, aggregator: str = "gcond", lr: float = 1e-2) -> None:
        super().__init__(aggregator)
        self.save_hyperparameters()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleDict({task: nn.Linear(16, 1) for task in TASKS})

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> TaskLosses:
        inputs, targets = batch
        features = self.trunk(inputs)
        losses = {
            task: ((head(features)[:, 0] - targets[:, k]) ** 2).mean()
            for k, (task, head) in enumerate(self.heads.items())
        }
        return TaskLosses(losses, features=features)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data(batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16 * batches, 8, generator=generator)
    targets = torch.stack([inputs[:, 0], inputs[:, 1] - inputs[:, 0], 5 * inputs[:, 2]], dim=1)
    return DataLoader(TensorDataset(inputs, targets), batch_size=16)  # one epoch: `batches` steps


def trainer(epochs: int, accumulate: int, directory: Path) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        default_root_dir=directory,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps in all")
    parser.add_argument("--output", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--aggregator", default="gcond", help="a name for aggregator_from_config")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    output = args.output or Path(tempfile.mkdtemp())
    output.mkdir(parents=True, exist_ok=True)
    # Two epochs of steps/2 optimizer steps each: the checkpoint falls between them.
    batches = max(args.steps // 2, 1) * args.accumulate

    torch.manual_seed(0)
    uninterrupted = MultiTask(args.aggregator)
    whole = trainer(2, args.accumulate, output)
    whole.fit(uninterrupted, data(batches))

    torch.manual_seed(0)
    first = MultiTask(args.aggregator)
    half = trainer(1, args.accumulate, output)
    half.fit(first, data(batches))
    checkpoint = output / "halfway.ckpt"
    half.save_checkpoint(checkpoint)
    resumed = MultiTask(args.aggregator)  # a fresh module: its aggregator has no state yet
    rest = trainer(2, args.accumulate, output)
    rest.fit(resumed, data(batches), ckpt_path=checkpoint)

    same_parameters = all(
        torch.equal(p, q)
        for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True)
    )
    states = (uninterrupted.aggregator.state_dict(), resumed.aggregator.state_dict())
    same_aggregator = all(torch.equal(value, states[1][key]) for key, value in states[0].items())
    optimizers = [t.optimizers[0].state_dict()["state"] for t in (whole, rest)]
    same_optimizer = all(
        torch.equal(value, optimizers[1][index][key])
        for index, state in optimizers[0].items()
        for key, value in state.items()
    )
    weights = {
        key.removeprefix("task_weights/weight/"): round(float(value), 4)
        for key, value in rest.callback_metrics.items()
        if key.startswith("task_weights/weight/")
    }
    print(f"aggregator: {uninterrupted.aggregator!r}")
    print(f"optimizer steps: {whole.global_step}, accumulate_grad_batches: {args.accumulate}")
    print(f"aggregator state in the checkpoint: {', '.join(states[0])}")
    print(f"last task weights: {weights}")
    print(f"parameters {same_parameters}, optimizer {same_optimizer}, aggregator {same_aggregator}")
    if same_parameters and same_optimizer and same_aggregator:
        print("resume: identical")
    else:
        print("resume: DIFFERENT")
        sys.exit(1)


if __name__ == "__main__":
    main()
