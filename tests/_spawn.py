"""Running a function on two gloo processes on 127.0.0.1, bounded in time, for the tests."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
TIMEOUT_SECONDS = 240.0


def _worker(
    rank: int, function: Callable[[int], Any], init_file: str, output: str, world_size: int
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        result = function(rank)
        torch.save(result, Path(output) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def on_ranks(
    function: Callable[[int], Any],
    *,
    world_size: int = WORLD_SIZE,
    timeout: float = TIMEOUT_SECONDS,
) -> list[Any]:
    """
    Runs ``function(rank)`` on ``world_size`` processes of one gloo group and returns what each
    returned (saved with ``torch.save``), in rank order. A run that outlives ``timeout`` seconds
    is killed and fails the test.
    """

    with tempfile.TemporaryDirectory() as directory:
        context = mp.start_processes(
            _worker,
            args=(function, str(Path(directory) / "init"), directory, world_size),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"The {world_size} processes did not finish in {timeout} s.")
        return [
            torch.load(Path(directory) / f"rank{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]
