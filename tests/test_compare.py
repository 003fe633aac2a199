"""The ``torchjd-golden compare`` command, its runs, its report and its figures."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchjd_golden.compare import main
from torchjd_golden.compare._methods import build_method
from torchjd_golden.compare._report import delta_m, markdown_report, summarize
from torchjd_golden.compare._training import (
    Job,
    Run,
    _train_method,
    _train_single_task,
    load_workload,
    run_job,
)
from torchjd_golden.compare._workloads import Workload

OPTIONAL_MODULES = ("matplotlib", "sklearn", "tqdm", "yaml", "omegaconf")
INSTALL_HINT = "pip install 'torchjd-golden[compare]'"


def _results(path: Path) -> dict[tuple[str, str, str], tuple[float, float]]:
    with path.open() as file:
        return {
            (r["workload"], r["method"], r["quantity"]): (float(r["mean"]), float(r["std"]))
            for r in csv.DictReader(file)
        }


def _runs(path: Path) -> dict[tuple[str, str, int, str], float]:
    with path.open() as file:
        return {
            (r["workload"], r["method"], int(r["seed"]), r["quantity"]): float(r["value"])
            for r in csv.DictReader(file)
        }


def test_a_small_run_writes_the_report_the_tables_and_the_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = 12
    code = main(
        [
            "compare",
            "--methods",
            "golden_pendulum,mean,gaba",
            "--workload",
            "synthetic",
            "--steps",
            str(steps),
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "results.md").read_text() in printed
    assert "| GoldenPendulum |" in printed
    assert "ranking (R2)" in printed
    assert "(seeds 0, 1)" in printed
    assert "`GABA(beta=0.99, warmup_steps=100, min_weight=0.05)`" in printed  # the footnote
    for picture in ("synthetic.png", "summary.png"):
        assert (tmp_path / picture).read_bytes().startswith(b"\x89PNG")

    results, runs = _results(tmp_path / "results.csv"), _runs(tmp_path / "runs.csv")
    assert results[("synthetic", "Mean", "balance_ratio")] == pytest.approx((1.0, 0.0))
    assert results[("synthetic", "Mean", "largest_weight")] == pytest.approx((0.25, 0.0))
    # Golden Pendulum's QP stays near the golden targets: w_min / w_max close to 1/phi^3.
    assert results[("synthetic", "GoldenPendulum", "balance_ratio")][0] == pytest.approx(
        0.236, abs=0.03
    )
    assert results[("synthetic", "GABA", "balance_ratio")][0] == pytest.approx(1.0)  # warm-up

    # Each seed's Δm% is against the single-task baselines of the same seed, and the table's
    # mean and standard deviation are those of the seeds.
    tasks = load_workload("synthetic", 0).tasks
    for seed in (0, 1):
        mine = {t.name: runs[("synthetic", "Mean", seed, f"{t.name} {t.metric}")] for t in tasks}
        alone = {
            t.name: runs[("synthetic", "single-task baselines", seed, f"{t.name} {t.metric}")]
            for t in tasks
        }
        expected = 100 * sum((mine[k] - alone[k]) / alone[k] for k in mine) / len(mine)
        assert runs[("synthetic", "Mean", seed, "delta_m_percent")] == pytest.approx(expected)
    per_seed = torch.tensor([runs[("synthetic", "GABA", s, "delta_m_percent")] for s in (0, 1)])
    assert results[("synthetic", "GABA", "delta_m_percent")] == pytest.approx(
        (float(per_seed.mean()), float(per_seed.std()))
    )

    # Runs in worker processes (one thread each) give what the same job gives in this one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_job(Job("synthetic", 1, steps, method="mean"))
    finally:
        torch.set_num_threads(threads)
    for task in tasks:
        key = ("synthetic", "Mean", 1, f"{task.name} {task.metric}")
        assert runs[key] == pytest.approx(again.metrics[task.name], abs=1e-6)


def test_both_workloads_by_default(tmp_path: Path) -> None:
    main(
        [
            "compare",
            "--methods",
            "mean",
            "--steps",
            "4",
            "--seeds",
            "1",
            "--jobs",
            "1",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    results = _results(tmp_path / "results.csv")
    assert ("synthetic", "Mean", "hedge R2") in results
    assert ("digits", "Mean", "class accuracy") in results
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "synthetic.png",
        "digits.png",
        "summary.png",
    }


def _one_task(workload: Workload, index: int) -> Workload:
    return Workload(
        "one task",
        "one task",
        (workload.tasks[index],),
        workload.train_inputs,
        workload.train_targets[:, [index]],
        workload.test_inputs,
        workload.test_targets[:, [index]],
    )


def test_the_baseline_is_the_same_training_on_one_task() -> None:
    """With one task, Mean through mtl_backward and jac_to_grad is the baseline's plain step."""

    workload = _one_task(load_workload("synthetic", 0), 2)
    job = Job("one task", 3, 25, method="mean")
    method = build_method("mean", workload, job.steps)
    multi_task = _train_method(workload, job, method, torch.device("cpu"))
    alone = _train_single_task(workload, job, 0, torch.device("cpu"))
    torch.testing.assert_close(multi_task.losses, alone.losses, rtol=1e-5, atol=1e-6)
    assert multi_task.metrics == pytest.approx(alone.metrics, abs=1e-5)
    assert delta_m(multi_task.metrics, alone.metrics, workload.tasks) == pytest.approx(0, abs=1e-3)


def test_delta_m_by_hand() -> None:
    tasks = load_workload("synthetic", 0).tasks[:2]
    metrics = {tasks[0].name: 0.9, tasks[1].name: 0.5}
    baseline = {tasks[0].name: 1.0, tasks[1].name: 0.4}
    assert delta_m(metrics, baseline, tasks) == pytest.approx(100 * (-0.1 + 0.25) / 2)


def test_the_settings_of_the_fair_comparison() -> None:
    synthetic = load_workload("synthetic", 0)
    nash = build_method("nash_mtl", synthetic, 300).aggregator
    assert nash.weighting.n_tasks == 4
    assert nash.weighting.update_weights_every == 20
    # ExcessMTL: LibMTL's step size, three epochs of warm-up (3 x 3277 // 64), at most half a run.
    assert synthetic.steps_per_epoch(64) == 51
    excess = build_method("excess_mtl", synthetic, 400)
    assert repr(excess.aggregator) == "ExcessMTL(robust_step_size=0.01, n_warmup_steps=153)"
    assert build_method("excess_mtl", synthetic, 100).aggregator.n_warmup_steps == 50
    # GCond's momentum is the only first moment.
    assert build_method("gcond", synthetic, 300).settings.adam_betas == (0.0, 0.95)
    assert build_method("mean", synthetic, 300).settings.adam_betas == (0.9, 0.999)
    assert build_method("MGDA", synthetic, 300).settings.source.startswith("its class's defaults")


def _fake_run(method: str | None, seed: int, weights: list[float] | None, task: int | None) -> Run:
    steps, metrics = 10, {"ranking": 0.9, "classification": 0.8, "regression": 0.7, "hedge": 0.6}
    if task is not None:
        metrics = {list(metrics)[task]: 0.5}
    return Run(
        job=Job("synthetic", seed, steps, method=method, task=task),
        metrics=metrics,
        seconds_per_step=0.001,
        losses=torch.ones(steps, 1 if task is not None else 4),
        weights=None if weights is None else torch.tensor(weights).expand(steps, 4),
    )


@pytest.mark.parametrize(("nash_balance", "verdict"), [(0.03, "reproduced"), (0.3, "NOT")])
def test_the_report_checks_the_paper_and_explains_a_collapse(
    nash_balance: float, verdict: str
) -> None:
    workload = load_workload("synthetic", 0)
    names = ("golden_pendulum", "nash_mtl", "excess_mtl")
    methods = {"synthetic": [build_method(name, workload, 10) for name in names]}
    weights = {
        "golden_pendulum": [0.1, 0.15, 0.3, 0.42],  # 0.1 / 0.42 = 0.238
        "nash_mtl": [0.5 * nash_balance, 0.2, 0.3, 0.5],
        "excess_mtl": [0.97, 0.01, 0.01, 0.01],
    }
    runs = [_fake_run(name, seed, weights[name], None) for name in names for seed in (0, 1)]
    runs += [_fake_run(None, seed, None, task) for task in range(4) for seed in (0, 1)]
    report = markdown_report(summarize([workload], methods, runs), steps=10, jobs=1)
    assert "GoldenPendulum 0.238 ± 0.000 (paper 0.24)" in report
    assert f"NashMTL {nash_balance:.3f} ± 0.000 (paper 0.04): {verdict}" in report
    assert "ExcessMTL collapses onto 'ranking' on synthetic (largest weight 0.97): ExcessMTL" in (
        report
    )
    assert "| single-task baselines | 0.500 ± 0.000 |" in report
    assert "| +50.00 ± 0.00 |" in report  # ((0.9 + 0.8 + 0.7 + 0.6) / 4 - 0.5) / 0.5


def test_an_unknown_method_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--methods", "golden_pendulum,nope", "--steps", "2", "--no-progress"])
    assert exit_info.value.code == 2
    assert "Unknown aggregator 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments",
    [
        ["--steps", "1"],
        ["--seeds", "0"],
        ["--jobs", "0"],
        ["--methods", " , "],
        ["--methods", "mean,Mean"],  # one method twice, under two names
        ["--workload", "mnist"],
        ["--device", "nope"],
    ],
)
def test_bad_options_are_usage_errors(arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *arguments, "--no-progress"])
    assert exit_info.value.code == 2


def _python(code: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *arguments],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_importing_the_package_imports_no_optional_dependency() -> None:
    blocked = _python(
        f"""
        import sys
        for name in {OPTIONAL_MODULES!r}:
            sys.modules[name] = None  # importing it now raises ImportError
        import torchjd_golden, torchjd_golden.compare
        """
    )
    assert blocked.returncode == 0, blocked.stderr
    # torch imports tqdm for torch.hub where it is installed; nothing imports the others.
    loaded = _python(
        """
        import sys
        import torchjd_golden, torchjd_golden.compare
        print(sorted({"matplotlib", "sklearn", "yaml", "omegaconf"} & set(sys.modules)))
        """
    )
    assert loaded.stdout.strip() == "[]", loaded.stderr


@pytest.mark.parametrize(
    ("blocked", "arguments", "named"),
    [
        (("matplotlib", "sklearn", "tqdm"), [], "needs matplotlib, scikit-learn and tqdm,"),
        (("sklearn",), ["--no-progress"], "needs scikit-learn,"),
        (
            ("cvxpy",),
            ["--workload", "synthetic", "--methods", "mean,nash_mtl"],
            "needs cvxpy for NashMTL",
        ),
    ],
)
def test_without_the_extra_compare_says_so_in_one_line(
    tmp_path: Path, blocked: tuple[str, ...], arguments: list[str], named: str
) -> None:
    output = tmp_path / "out"
    result = _python(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from torchjd_golden.compare import main
        sys.exit(main(["compare", "--output", sys.argv[1], *sys.argv[2:]]))
        """,
        str(output),
        *arguments,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert INSTALL_HINT in lines[0]
    assert not output.exists()  # nothing was trained


def test_help_explains_the_options_without_the_extra() -> None:
    result = _python(
        f"""
        import sys
        for name in {OPTIONAL_MODULES!r}:
            sys.modules[name] = None
        from torchjd_golden.compare import main
        main(["compare", "--help"])
        """
    )
    assert result.returncode == 0, result.stderr
    for option in ("--methods", "--workload", "--steps", "--seeds", "--jobs", "--output"):
        assert option in result.stdout
    assert "Delta_m%" in result.stdout


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torchjd_golden", "compare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--seeds" in result.stdout


SCRIPT = Path(sys.executable).parent / "torchjd-golden"


@pytest.mark.skipif(not SCRIPT.exists(), reason="the package is not installed in this environment")
def test_the_console_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(SCRIPT),
            "compare",
            "--methods",
            "mean",
            "--workload",
            "synthetic",
            "--steps",
            "3",
            "--seeds",
            "1",
            "--jobs",
            "1",
            "--output",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| Mean |" in result.stdout
