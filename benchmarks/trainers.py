"""
The cost of the trainer integrations and of the diagnostics flag, per optimizer step, on the
training-step model of ``python -m benchmarks`` (1.31M shared parameters, 8 heads, batch 128,
Golden Pendulum, SGD): a plain torchjd loop (``mtl_backward`` + ``jac_to_grad``) against
``MultiTaskModule`` under ``lightning.Trainer`` and ``MultiTaskTrainer`` of Hugging Face, each with
and without ``diagnostics=True``.

A step is timed from the start of the batch to the end of the optimizer step (Lightning's
``on_train_batch_start``/``on_train_batch_end``, Hugging Face's ``on_step_begin``/``on_step_end``,
the same span by hand for the loop); each configuration runs ``--steps`` steps per round, the
rounds alternate the configurations so that drift hits all alike, and the table gives the median.

With ``--processes 2`` it also times each integration on 2 gloo processes (``strategy="ddp"``,
torchrun's environment for Hugging Face) against 1, on the same global batch (half on each
rank), in the same run, rounds alternating.

Run: ``python -m benchmarks.trainers [--steps 30] [--rounds 5] [--processes 2]``
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import ConflictMonitor, GoldenPendulum
from torchjd_golden.step._task_step import JacobianStep

from .training_step import BATCH, N_TASKS, Network, _losses

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Batches(Dataset):  # type: ignore[type-arg]
    """The same batch again and again, as the training-step benchmark uses."""

    def __init__(self, steps: int, processes: int = 1) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(BATCH // processes, 256, generator=generator)
        self.targets = torch.randn(BATCH // processes, N_TASKS, generator=generator)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"inputs": self.inputs, "targets": self.targets}


def _collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return items[0]


def _network() -> Network:
    torch.manual_seed(0)
    return Network()


def plain_loop(steps: int, diagnostics: bool) -> list[float]:
    network = _network()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-4)
    aggregator = GoldenPendulum()
    if diagnostics:  # the same hook and recorder as the integrations'
        JacobianStep(aggregator, diagnostics=True)
    batch = Batches(1)[0]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        features, outputs = network(batch["inputs"])
        mtl_backward(_losses(outputs, batch["targets"]), features=features)
        jac_to_grad(network.trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def lightning_loop(steps: int, diagnostics: bool, processes: int = 1) -> list[float]:
    from lightning import Callback, Trainer  # noqa: PLC0415 - optional dependency

    from torchjd_golden.integrations.lightning import MultiTaskModule, TaskLosses  # noqa: PLC0415

    class Module(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__(GoldenPendulum(), diagnostics=diagnostics)
            self.network = _network()

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> TaskLosses:
            features, outputs = self.network(batch["inputs"])
            return TaskLosses(_losses(outputs, batch["targets"]), features=features)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    times: list[float] = []

    class Timer(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            times.append(time.perf_counter() - self.start)

    trainer = Trainer(
        accelerator="cpu",
        devices=processes,
        strategy="ddp" if processes > 1 else "auto",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    )
    data = DataLoader(Batches(steps * processes, processes), batch_size=1, collate_fn=_collate)
    trainer.fit(Module(), data)
    return times


class HuggingFaceNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.network = _network()

    def forward(self, inputs: Tensor, targets: Tensor) -> dict[str, Any]:
        features, outputs = self.network(inputs)
        return {"losses": _losses(outputs, targets), "features": features}


def huggingface_loop(steps: int, diagnostics: bool, processes: int = 1) -> list[float]:
    from transformers import TrainerCallback, TrainingArguments  # noqa: PLC0415

    from torchjd_golden.integrations.huggingface import MultiTaskTrainer  # noqa: PLC0415

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output,
            max_steps=steps,
            per_device_train_batch_size=1,
            learning_rate=1e-4,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = MultiTaskTrainer(
            model=HuggingFaceNetwork(),
            args=arguments,
            train_dataset=Batches(steps * processes, processes),
            data_collator=_collate,
            aggregator=GoldenPendulum(),
            diagnostics=diagnostics,
            callbacks=[Timer()],
        )
        trainer.train()
    return times


LOOPS: dict[str, Callable[[int, bool], list[float]]] = {
    "plain torchjd loop": plain_loop,
    "Lightning MultiTaskModule": lightning_loop,
    "Hugging Face MultiTaskTrainer": huggingface_loop,
}


def trainer_table(steps: int, rounds: int) -> dict[tuple[str, bool], float]:
    """Median seconds per step of each loop, with and without diagnostics, and the table."""

    samples: dict[tuple[str, bool], list[float]] = {
        (name, flag): [] for name in LOOPS for flag in (False, True)
    }
    for _ in range(rounds):
        for (name, flag), values in samples.items():
            values.extend(LOOPS[name](steps, flag)[2:])  # the first steps warm up
    medians = {key: statistics.median(values) for key, values in samples.items()}
    plain = medians[("plain torchjd loop", False)]
    print(
        f"## Trainer integrations, {steps} steps x {rounds} rounds, Golden Pendulum, "
        f"{N_TASKS} tasks, batch {BATCH}\n"
    )
    print("| loop | ms/step | / plain loop | with diagnostics, ms | diagnostics cost |")
    print("|---|---|---|---|---|")
    for name in LOOPS:
        off, on = medians[(name, False)], medians[(name, True)]
        print(
            f"| {name} | {1e3 * off:.1f} | {off / plain:.3f} | {1e3 * on:.1f} | "
            f"{100 * (on - off) / off:+.1f}% |"
        )
    record = diagnostics_record_seconds()
    print(
        f"\nThe diagnostics engine's own work per step (ConflictMonitor.record at m = {N_TASKS}, "
        f"window full, median of 200): {1e3 * record:.2f} ms, {100 * record / plain:.1f}% of the "
        "plain loop's step; the column above also carries the noise between runs."
    )
    print("\nTarget: the diagnostics flag at most 2% of the step.\n")
    return medians


def _timed_on_rank(name: str, steps: int, port: int, rank: int, output: str) -> None:
    """One of 2 processes with torchrun's environment: rank 0 saves its step times."""

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    _quiet()
    times = LOOPS[name](steps, False, 2)  # type: ignore[call-arg]
    if rank == 0:
        torch.save(times, output)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def on_two_processes(name: str, steps: int) -> list[float]:
    """The step times of rank 0 of a 2-process run of ``name``."""

    import torch.multiprocessing as mp  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "times.pt")
        mp.start_processes(
            functools.partial(_timed_on_rank, name, steps, port),
            args=(output,), nprocs=2, start_method="spawn",
        )  # fmt: skip
        return list(torch.load(output))


def processes_table(steps: int, rounds: int) -> dict[tuple[str, int], float]:
    """Median seconds per step of each integration on 1 and 2 processes, and the table."""

    names = ("Lightning MultiTaskModule", "Hugging Face MultiTaskTrainer")
    samples: dict[tuple[str, int], list[float]] = {(n, p): [] for n in names for p in (1, 2)}
    for _ in range(rounds):
        for name in names:
            samples[(name, 1)].extend(LOOPS[name](steps, False)[2:])
            samples[(name, 2)].extend(on_two_processes(name, steps)[2:])
    medians = {key: statistics.median(values) for key, values in samples.items()}
    print(
        f"## 2 processes (gloo, CPU) against 1, global batch {BATCH}, {steps} steps x {rounds} "
        "rounds, Golden Pendulum, gramian_from='parameters'\n"
    )
    print("| integration | 1 process, ms/step | 2 processes, ms/step | 2 / 1 |")
    print("|---|---|---|---|")
    for name in names:
        one, two = medians[(name, 1)], medians[(name, 2)]
        print(f"| {name} | {1e3 * one:.1f} | {1e3 * two:.1f} | {two / one:.2f} |")
    print()
    return medians


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415

    transformers_logging.set_verbosity_error()


def diagnostics_record_seconds(calls: int = 200) -> float:
    """Median seconds of one ConflictMonitor.record of an m-task step once its window is full."""

    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(N_TASKS, 1000, generator=generator)
    gramian, weights = jacobian @ jacobian.T, torch.full((N_TASKS,), 1.0 / N_TASKS)
    monitor = ConflictMonitor()
    for _ in range(monitor.window_size):
        monitor.record(gramian, weights)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        monitor.record(gramian, weights)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.trainers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each configuration")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    args = parser.parse_args()
    _quiet()
    trainer_table(args.steps, args.rounds)
    if args.processes == 2:
        processes_table(args.steps, args.rounds)


if __name__ == "__main__":
    main()
