"""Every script in examples/ runs, at small sizes, and prints its table."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "amp.py": (["--steps", "20"], "with_grad_scaler"),
    "autogram.py": (["--steps", "5"], "engine vs autojac"),
    "autojac.py": (["--steps", "5"], "GCond"),
    "monitoring.py": (["--steps", "6"], "JSON lines and TensorBoard"),
    "ddp.py": (["--steps", "3"], "processes: 2, one process: max relative difference"),
    "fsdp2.py": (["--steps", "3"], "processes: 2, one process: max relative difference"),
    "jacobian_descent.py": (["--steps", "3"], "parameters is torchjd's step"),
    "config_swap.py": ([str(ROOT / "examples" / "configs" / "upgrad.yaml")], "aggregator: UPGrad"),
    "gcond_accumulation.py": (["--steps", "5", "--micro-batches", "3"], "stochastic"),
    "lightning_trainer.py": (["--steps", "6"], "resume: identical\n"),
    "huggingface_trainer.py": (["--steps", "4"], "resume: identical\n"),
    "drop_in.py": (["--steps", "4"], "against golden_pendulum over 4 steps: weights within"),
    "task_groups.py": (["--steps", "6"], "after add_task('calibration', 'meta')"),
    "curriculum.py": (["--steps", "3"], "resumed mid-phase: identical"),
    "diagnostics.py": (["--steps", "20"], "=== Golden Pendulum Diagnostics (last 10 steps) ==="),
    "presets.py": ([], "robotics_control    joint        50000"),
    "tasks_by_name.py": (["--steps", "12"], "with names: 0 resets"),
}


def test_every_example_is_run() -> None:
    """Every script is run; a module whose name starts with ``_`` is what scripts share."""

    scripts = {p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(RUNS)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs(script: str) -> None:
    arguments, expected = RUNS[script]
    result = _run(script, arguments, ROOT)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    if expected.startswith("resume:"):  # the contract of the trainer examples: the last line
        assert result.stdout.endswith(expected)


def test_config_swap_without_an_argument_reads_the_golden_pendulum_config(tmp_path: Path) -> None:
    """The config beside the script, whatever the working directory."""

    result = _run("config_swap.py", [], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "aggregator: GoldenPendulum(lam=0.5, " in result.stdout


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_huggingface_example_runs_under_the_launchers(launcher: str, tmp_path: Path) -> None:
    """The guide's commands: 2 processes, each rank resumed identically, equal to one process."""

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    binaries = Path(sys.executable).parent
    if launcher == "torchrun":
        command = [str(binaries / "torchrun"), "--nproc-per-node", "2", "--master-port", port]
    else:
        config = ROOT / "examples" / "configs" / "accelerate_cpu.yaml"
        command = [str(binaries / "accelerate"), "launch", "--config_file", str(config)]
        command += ["--main_process_port", port]
    script = str(ROOT / "examples" / "huggingface_trainer.py")
    result = subprocess.run(
        [*command, script, "--steps", "2", "--output", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.endswith("resume: identical\n")
    difference = re.search(
        r"processes: 2, one process: max relative difference (\S+)", result.stdout
    )
    assert difference is not None, result.stdout[-3000:]
    assert float(difference.group(1)) <= 1e-5  # float32: the bound on the parameters
    checkpoint = tmp_path / "uninterrupted" / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.glob("aggregator*")) == [
        "aggregator_0.pt",
        "aggregator_1.pt",
    ]


def _run(script: str, arguments: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *arguments],
        cwd=cwd,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
