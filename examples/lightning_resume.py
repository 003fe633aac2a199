"""
A stateful aggregator inside a PyTorch Lightning module: its state goes into Lightning's
checkpoint, and a run resumed from that checkpoint continues exactly as an uninterrupted one.

The aggregator is built once, in ``__init__``, as a submodule of the LightningModule (torchjd's
Lightning example builds a new aggregator at every step, which would reset a stateful one).
Training uses manual optimization: ``mtl_backward`` then ``jac_to_grad`` in ``training_step``.

Run: ``python examples/lightning_resume.py [--aggregator gcond] [--epochs 4]``
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from lightning import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import aggregator_from_config


class MultiTaskModule(LightningModule):
    def __init__(self, aggregator: str = "gcond") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(3)])
        self.aggregator = aggregator_from_config(aggregator)  # its buffers are checkpointed

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        features = self.trunk(inputs)
        losses = [
            ((head(features)[:, 0] - target) ** 2).mean()
            for head, target in zip(self.heads, targets.T, strict=True)
        ]
        optimizer = self.optimizers()
        mtl_backward(losses, features=features)
        jac_to_grad(self.trunk.parameters(), self.aggregator)
        optimizer.step()
        optimizer.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(160, 8, generator=generator)
    targets = torch.stack([inputs[:, 0], -inputs[:, 0] + inputs[:, 1], 5 * inputs[:, 2]], dim=1)
    return DataLoader(TensorDataset(inputs, targets), batch_size=16)


def fit(model: MultiTaskModule, epochs: int, checkpoint: Path | None = None) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=data(), ckpt_path=checkpoint)
    return trainer


def uninterrupted_and_resumed(
    aggregator: str, epochs: int, directory: Path
) -> tuple[MultiTaskModule, MultiTaskModule, dict]:
    """Trains ``epochs`` epochs in one go, and again with a checkpoint and a fresh model halfway."""

    torch.manual_seed(0)
    uninterrupted = MultiTaskModule(aggregator)
    fit(uninterrupted, epochs)

    torch.manual_seed(0)
    first_half = MultiTaskModule(aggregator)
    path = directory / "halfway.ckpt"
    fit(first_half, epochs // 2).save_checkpoint(path)
    resumed = MultiTaskModule(aggregator)  # a fresh instance: empty aggregator state
    fit(resumed, epochs, checkpoint=path)
    return uninterrupted, resumed, torch.load(path, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aggregator", default="gcond", help="a name for aggregator_from_config")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the uninterrupted run")
    args = parser.parse_args()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

    with tempfile.TemporaryDirectory() as directory:
        uninterrupted, resumed, checkpoint = uninterrupted_and_resumed(
            args.aggregator, args.epochs, Path(directory)
        )
    state = [key for key in checkpoint["state_dict"] if key.startswith("aggregator.")]
    difference = max(
        (p - q).abs().max().item()
        for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True)
    )
    print(f"aggregator: {uninterrupted.aggregator!r}")
    print(f"aggregator state in the checkpoint: {', '.join(state)}")
    print(f"largest parameter difference, resumed vs uninterrupted: {difference:.3g}")


if __name__ == "__main__":
    main()
