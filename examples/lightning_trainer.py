"""
A multi-task LightningModule trained by Jacobian descent with a stateful aggregator, checkpointed
halfway, resumed in a fresh process-like setting (new module, new Trainer), and compared with an
uninterrupted run: parameters, optimizer state and aggregator state must be bit-identical. With
``--processes N`` the runs are those of ``Trainer(strategy="ddp", devices=N)`` on N gloo
processes on CPU (launched as torchrun launches them), compared with one process on the same
global batches.

Run: ``python examples/lightning_trainer.py [--steps N] [--output DIR] [--aggregator NAME]
[--accumulate K] [--processes N] [--gramian-from {parameters,features}]``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _data_parallel import as_torchrun_process, free_port, max_relative_difference
from lightning import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchjd_golden.integrations.lightning import MultiTaskModule, TaskLosses

TASKS = ("position", "difference", "scaled")


class MultiTask(MultiTaskModule):
    """A shared trunk and one head per task; the aggregator is named in the hyper-parameters."""

    def __init__(
        self, aggregator: str = "gcond", lr: float = 1e-2, gramian_from: str = "parameters"
    ) -> None:
        super().__init__(aggregator, gramian_from=gramian_from)  # type: ignore[arg-type]
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


def data(batches: int, processes: int) -> DataLoader:
    """``batches`` batches of 16 in order; on N processes each rank takes every N-th sample."""

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16 * batches, 8, generator=generator)
    targets = torch.stack([inputs[:, 0], inputs[:, 1] - inputs[:, 0], 5 * inputs[:, 2]], dim=1)
    dataset = TensorDataset(inputs, targets)
    # Lightning's own sampler would shuffle: this one keeps one process's global batches.
    sampler = None
    if processes > 1:  # made before Lightning joins the ranks: told which rank this is
        rank = int(os.environ["RANK"])
        sampler = DistributedSampler(dataset, num_replicas=processes, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=16 // processes, sampler=sampler)


def trainer(epochs: int, accumulate: int, directory: Path, processes: int) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=processes,
        strategy="ddp" if processes > 1 else "auto",
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        default_root_dir=directory,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit_and_resume(args: argparse.Namespace, output: Path, processes: int) -> dict[str, object]:
    """An uninterrupted run, and one checkpointed halfway and resumed in a fresh module."""

    # Two epochs of steps/2 optimizer steps each: the checkpoint falls between them.
    batches = max(args.steps // 2, 1) * args.accumulate

    def fresh() -> MultiTask:
        return MultiTask(args.aggregator, gramian_from=args.gramian_from)

    torch.manual_seed(0)
    uninterrupted = fresh()
    whole = trainer(2, args.accumulate, output, processes)
    whole.fit(uninterrupted, data(batches, processes))

    torch.manual_seed(0)
    first = fresh()
    half = trainer(1, args.accumulate, output, processes)
    half.fit(first, data(batches, processes))
    checkpoint = output / "halfway.ckpt"
    half.save_checkpoint(checkpoint)  # every process calls it; the first writes it
    resumed = fresh()  # a fresh module: its aggregator has no state yet
    rest = trainer(2, args.accumulate, output, processes)
    rest.fit(resumed, data(batches, processes), ckpt_path=checkpoint)

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
    return {
        "parameters": [p.detach().clone() for p in uninterrupted.parameters()],
        "same": (same_parameters, same_optimizer, same_aggregator),
        "lines": [
            f"aggregator: {uninterrupted.aggregator!r}, gramian_from: {args.gramian_from}",
            f"optimizer steps: {whole.global_step}, accumulate_grad_batches: {args.accumulate}",
            f"aggregator state in the checkpoint: {', '.join(states[0])}",
            f"last task weights: {weights}",
        ],
    }


def worker(rank: int, args: argparse.Namespace, output: Path, port: int) -> None:
    """One of the processes, with the environment torchrun would give it."""

    quiet()
    as_torchrun_process(rank, args.processes, port)
    os.environ["NODE_RANK"] = "0"  # Lightning's
    result = fit_and_resume(args, output, args.processes)
    torch.save(result, output / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps in all")
    parser.add_argument("--output", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--aggregator", default=None, help="a name for aggregator_from_config")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--processes", type=int, default=1, help="DDP processes (gloo, CPU)")
    parser.add_argument("--gramian-from", choices=("parameters", "features"), default="parameters")
    args = parser.parse_args()
    if args.aggregator is None:  # the features need a Gramian weighting
        args.aggregator = "gcond" if args.gramian_from == "parameters" else "golden_pendulum"
    quiet()
    output = args.output or Path(tempfile.mkdtemp())
    output.mkdir(parents=True, exist_ok=True)

    if args.processes == 1:
        result = fit_and_resume(args, output, 1)
        same = result["same"]
    else:
        mp.start_processes(
            worker, args=(args, output, free_port()), nprocs=args.processes, start_method="spawn"
        )
        results = [torch.load(output / f"rank{r}.pt") for r in range(args.processes)]
        result = results[0]
        same = tuple(all(r["same"][k] for r in results) for k in range(3))  # type: ignore[index]
        torch.manual_seed(0)
        alone = MultiTask(args.aggregator, gramian_from=args.gramian_from)
        batches = max(args.steps // 2, 1) * args.accumulate
        trainer(2, args.accumulate, output, 1).fit(alone, data(batches, 1))
        difference = max_relative_difference(
            result["parameters"], [p.detach() for p in alone.parameters()]
        )  # type: ignore[arg-type]
    for line in result["lines"]:  # type: ignore[attr-defined]
        print(line)
    print("parameters {}, optimizer {}, aggregator {}".format(*same))  # type: ignore[str-format]
    if args.processes > 1:
        print(f"processes: {args.processes}, one process: max relative difference {difference:.1e}")
    if all(same):  # type: ignore[arg-type]
        print("resume: identical")
    else:
        print("resume: DIFFERENT")
        sys.exit(1)


if __name__ == "__main__":
    main()
