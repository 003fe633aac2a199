"""
A tiny randomly initialised BERT (built from a config: nothing is downloaded) with three
regression heads, trained by the Hugging Face ``Trainer`` with a stateful aggregator, checkpointed
halfway, resumed from that checkpoint in a new Trainer, and compared with the uninterrupted run:
parameters, optimizer state and aggregator state must be bit-identical. With ``--processes N``
the runs are on N gloo processes on CPU launched as ``torchrun`` launches them (the Trainer wraps
the model in DistributedDataParallel itself), compared with one process on the same global
batches. Launched by ``torchrun`` or ``accelerate launch`` itself, the script trains on the
processes the launcher started, and the first of them runs the one-process comparison.

Run: ``python examples/huggingface_trainer.py [--steps N] [--output DIR] [--aggregator NAME]
[--accumulate K] [--processes N] [--gramian-from {parameters,features}]``, or
``torchrun --nproc-per-node 2 examples/huggingface_trainer.py [...]``, or
``accelerate launch --config_file examples/configs/accelerate_cpu.yaml
examples/huggingface_trainer.py [...]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _data_parallel import as_torchrun_process, free_port, max_relative_difference
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
    # No dropout: N processes draw their own masks, which one process could not draw alike.
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def train(
    output: Path,
    args: argparse.Namespace,
    steps: int,
    processes: int = 1,
    resume: Path | None = None,
) -> tuple[MultiTaskBert, MultiTaskTrainer]:
    torch.manual_seed(0)
    model = MultiTaskBert(CONFIG)
    arguments = TrainingArguments(
        str(output),
        max_steps=steps,
        per_device_train_batch_size=8 // processes,  # the global batch: 8
        gradient_accumulation_steps=args.accumulate,
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
        model=model, args=arguments, train_dataset=Tokens(64), aggregator=args.aggregator,
        gramian_from=args.gramian_from,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, trainer


def train_and_resume(args: argparse.Namespace, output: Path, processes: int) -> dict[str, Any]:
    """An uninterrupted run, and one resumed from its halfway checkpoint in a new Trainer."""

    steps = max(args.steps, 2)
    model, trainer = train(output / "uninterrupted", args, steps, processes)
    halfway = output / "uninterrupted" / f"checkpoint-{steps // 2}"
    resumed, again = train(output / "resumed", args, steps, processes, halfway)

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
    return {
        "parameters": [p.detach().clone() for p in model.parameters()],
        "same": (same_parameters, same_optimizer, same_aggregator),
        "lines": [
            f"aggregator: {trainer.aggregator!r}, gramian_from: {args.gramian_from}",
            f"optimizer steps: {trainer.state.global_step}, accumulation: {args.accumulate}",
            f"checkpoint: {', '.join(sorted(p.name for p in halfway.iterdir()))}",
            f"task weights in the last log: {weights}",
        ],
    }


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip


def launched(args: argparse.Namespace) -> None:
    """
    One of the processes ``torchrun`` or ``accelerate launch`` started: trains with the others;
    then the first checks that every rank resumed identically and compares with one process,
    run in a fresh interpreter without the launcher's environment.
    """

    rank, processes = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A folder every process sees: the checkpoints are written by rank 0, the states by each.
    output = args.output or Path(tempfile.gettempdir()) / f"hf-trainer-{os.environ['MASTER_PORT']}"
    output.mkdir(parents=True, exist_ok=True)
    result = train_and_resume(args, output, processes)
    torch.save(result, output / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return
    results = [torch.load(output / f"rank{r}.pt") for r in range(processes)]
    alone = output / "one process"
    command = [
        sys.executable, __file__, "--steps", str(args.steps), "--aggregator", args.aggregator,
        "--accumulate", str(args.accumulate), "--gramian-from", args.gramian_from,
        "--output", str(alone),
    ]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    subprocess.run(command, env=environment, check=True, capture_output=True)
    parameters = torch.load(alone / "parameters.pt")
    report(results, processes, max_relative_difference(result["parameters"], parameters))


def worker(rank: int, args: argparse.Namespace, output: Path, port: int) -> None:
    """One of the processes, with the environment torchrun would give it."""

    quiet()
    as_torchrun_process(rank, args.processes, port)
    result = train_and_resume(args, output, args.processes)
    torch.save(result, output / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def quiet() -> None:
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps in all")
    parser.add_argument("--output", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--aggregator", default=None, help="a name for aggregator_from_config")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--processes", type=int, default=1, help="DDP processes (gloo, CPU)")
    parser.add_argument("--gramian-from", choices=("parameters", "features"), default="parameters")
    args = parser.parse_args()
    if args.aggregator is None:  # the features need a Gramian weighting
        args.aggregator = "gcond" if args.gramian_from == "parameters" else "golden_pendulum"
    quiet()
    if "LOCAL_RANK" in os.environ:  # started by torchrun or accelerate launch
        launched(args)
        return
    output = args.output or Path(tempfile.mkdtemp())
    output.mkdir(parents=True, exist_ok=True)

    if args.processes == 1:
        result = train_and_resume(args, output, 1)
        torch.save(result["parameters"], output / "parameters.pt")  # for a launcher's comparison
        report([result], 1, None)
        return
    mp.start_processes(
        worker, args=(args, output, free_port()), nprocs=args.processes, start_method="spawn"
    )
    results = [torch.load(output / f"rank{r}.pt") for r in range(args.processes)]
    alone, _ = train(output / "one process", args, max(args.steps, 2))
    difference = max_relative_difference(
        results[0]["parameters"], [p.detach() for p in alone.parameters()]
    )
    report(results, args.processes, difference)


def report(results: list[dict[str, Any]], processes: int, difference: float | None) -> None:
    """Rank 0's lines, whether every rank resumed identically, and the comparison."""

    same = tuple(all(r["same"][k] for r in results) for k in range(3))
    for line in results[0]["lines"]:
        print(line)
    print("parameters {}, optimizer {}, aggregator {}".format(*same))
    if difference is not None:
        print(f"processes: {processes}, one process: max relative difference {difference:.1e}")
    if all(same):
        print("resume: identical")
    else:
        print("resume: DIFFERENT")
        sys.exit(1)


if __name__ == "__main__":
    main()
