"""The ``torchjd-golden compare`` command, its runs, its report and its figures."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchjd_golden import GoldenPendulum
from torchjd_golden.compare import _cli, main
from torchjd_golden.compare._methods import DEFAULT_METHODS, SETTINGS, Method, build_method
from torchjd_golden.compare._plots import _pyplot, _workload_figure
from torchjd_golden.compare._report import markdown_report
from torchjd_golden.compare._summary import balance, delta_m, mean_ranks, summarize
from torchjd_golden.compare._training import (
    Job,
    MultiTaskNetwork,
    Run,
    _batches,
    _train_method,
    _train_single_task,
    load_workload,
    run_job,
    update_shares,
)
from torchjd_golden.compare._workloads import WORKLOADS, Task, Workload

OPTIONAL_MODULES = ("matplotlib", "sklearn", "tqdm", "yaml", "omegaconf", "mnist1d", "scipy")
TASKS = ("ranking", "classification", "regression", "hedge")
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
    assert results[("synthetic", "Mean", "weight_balance")] == pytest.approx((1.0, 0.0))
    assert results[("synthetic", "Mean", "largest_weight")] == pytest.approx((0.25, 0.0))
    assert results[("synthetic", "GABA", "weight_balance")][0] == pytest.approx(1.0)  # warm-up
    # Golden Pendulum's QP stays near the golden targets: α_min / α_max close to 1/phi^3. Its
    # applied weights are far less balanced (the ranking's gradient is the largest by far), and
    # only Golden Pendulum has an α.
    golden_alpha = results[("synthetic", "GoldenPendulum", "alpha_balance")][0]
    assert golden_alpha == pytest.approx(0.236, abs=0.03)
    assert results[("synthetic", "GoldenPendulum", "weight_balance")][0] < golden_alpha / 5
    assert ("synthetic", "Mean", "alpha_balance") not in results
    # Every method reports the same quantities: weights and shares per task summing to one.
    for method in ("GoldenPendulum", "Mean", "GABA"):
        for kind in ("weight", "share"):
            total = sum(results[("synthetic", method, f"{t} {kind}")][0] for t in TASKS)
            assert total == pytest.approx(1.0, rel=1e-5)
    assert "α balance (paper's check)" in printed
    assert "| ranking w / s |" in printed

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


def test_every_workload_by_default(tmp_path: Path) -> None:
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
    assert ("multi-digits", "Mean", "right accuracy") in results
    assert ("mnist1d", "Mean", "noise R2") in results
    assert ("many-tasks", "Mean", "shear>p95 accuracy") in results
    assert ("many-tasks", "Mean", "mean_rank") in results
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "synthetic.png",
        "digits.png",
        "multi-digits.png",
        "mnist1d.png",
        "many-tasks.png",
        "summary.png",
    }
    report = (tmp_path / "results.md").read_text()
    assert "- many-tasks: MNIST-1D, Greydanus & Kobak" in report  # the sources, cited
    assert "- multi-digits: the MultiMNIST construction of Sener & Koltun" in report
    assert "| mean accuracy (40 tasks) |" in report


class _TrainingStartedError(Exception):
    """Raised instead of training: carries the jobs the command would have run."""

    def __init__(self, jobs: list[Job]) -> None:
        super().__init__()
        self.jobs = jobs


def _jobs_of(arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> list[Job]:
    """The jobs ``torchjd-golden compare`` with ``arguments`` would run, none of them run."""

    def started(jobs: list[Job], *_arguments: object, **_keywords: object) -> list[Run]:
        raise _TrainingStartedError(list(jobs))

    monkeypatch.setattr(_cli, "_run", started)
    with pytest.raises(_TrainingStartedError) as started_info:
        main(["compare", *arguments, "--no-progress"])
    return started_info.value.jobs


@pytest.mark.parametrize(
    ("arguments", "workloads"),
    [
        ([], ["synthetic", "digits", "multi-digits", "mnist1d", "many-tasks"]),
        (["--workloads", "mnist1d, digits,mnist1d"], ["mnist1d", "digits"]),
        (["--workloads", "many-tasks"], ["many-tasks"]),
        (["--workload", "multi-digits"], ["multi-digits"]),  # the earlier option still works
        (["--workload", "all"], ["synthetic", "digits", "multi-digits", "mnist1d", "many-tasks"]),
    ],
)
def test_workloads_option(
    arguments: list[str], workloads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = _jobs_of(["--methods", "mean", *arguments], monkeypatch)
    assert list(dict.fromkeys(job.workload for job in jobs)) == [
        w for w in sorted(workloads, key=lambda w: -len(load_workload(w, 0).tasks))
    ]  # the workloads with the most tasks first, so that the longest runs start first
    assert {job.workload for job in jobs} == set(workloads)


@pytest.mark.parametrize(
    ("arguments", "steps", "seeds"),
    [
        ([], 300, 2),
        (["--quick"], 150, 1),
        (["--quick", "--steps", "40"], 40, 1),
        (["--quick", "--seeds", "3"], 150, 3),
    ],
)
def test_quick_takes_fewer_steps_and_seeds(
    arguments: list[str], steps: int, seeds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = _jobs_of(["--methods", "mean", "--workloads", "digits", *arguments], monkeypatch)
    assert {job.steps for job in jobs} == {steps}
    assert {job.seed for job in jobs} == set(range(seeds))
    assert len(jobs) == seeds * (1 + 3)  # Mean and the 3 baselines per seed


def test_the_default_run_leaves_nash_mtl_out_of_many_tasks_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = _jobs_of(["--workloads", "mnist1d,many-tasks", "--seeds", "1"], monkeypatch)
    on = {w: {job.method for job in jobs if job.workload == w} - {None} for w in WORKLOADS}
    assert on["mnist1d"] == set(DEFAULT_METHODS)
    assert on["many-tasks"] == set(DEFAULT_METHODS) - {"nash_mtl"}
    assert jobs[0].method == "nash_mtl"  # the slowest first
    # Named in --methods, it runs there too.
    jobs = _jobs_of(["--workloads", "many-tasks", "--methods", "nash_mtl"], monkeypatch)
    assert {job.method for job in jobs} == {"nash_mtl", None}


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ("parameters", {"parameters": set(DEFAULT_METHODS)}),
        (
            None,  # the default: both
            {
                "parameters": set(DEFAULT_METHODS),
                "features": {"golden_pendulum", "gaba", "upgrad"},  # the Gramian weightings
            },
        ),
        ("features", {"features": {"golden_pendulum", "gaba", "upgrad"}}),
    ],
)
def test_gramian_from_runs_each_gramian_weighting_from_the_features_too(
    sources: str | None, expected: dict[str, set[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    option = [] if sources is None else ["--gramian-from", sources]
    jobs = _jobs_of(["--workloads", "synthetic", "--seeds", "1", *option], monkeypatch)
    ran: dict[str, set[str]] = {}
    for job in jobs:
        if job.method is not None:
            ran.setdefault(job.gramian_from, set()).add(job.method)
    assert ran == expected
    baselines = [job for job in jobs if job.task is not None]
    assert len(baselines) == 4
    assert {job.gramian_from for job in baselines} == {"parameters"}


def test_both_sources_side_by_side_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        [
            "compare",
            "--methods",
            "upgrad,excess_mtl",
            "--workloads",
            "synthetic",
            "--gramian-from",
            "parameters,features",
            "--steps",
            "6",
            "--seeds",
            "2",
            "--jobs",
            "1",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    results, runs = _results(tmp_path / "results.csv"), _runs(tmp_path / "runs.csv")
    assert ("synthetic", "UPGrad (features)", "delta_m_percent") in results
    assert not [key for key in results if key[1] == "ExcessMTL (features)"]
    # Each source's Δm% is the mean of its seeds', and the two differ (not one run twice).
    exact, fast = (
        torch.tensor([runs[("synthetic", label, s, "delta_m_percent")] for s in (0, 1)])
        for label in ("UPGrad", "UPGrad (features)")
    )
    assert not torch.equal(exact, fast)
    (line,) = [row for row in printed.splitlines() if row.startswith("| synthetic | UPGrad |")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[2] == f"{float(exact.mean()):+.2f} ± {float(exact.std()):.2f}"
    assert cells[3] == f"{float(fast.mean()):+.2f} ± {float(fast.std()):.2f}"
    assert cells[4] == f"{float(fast.mean()) - float(exact.mean()):+.2f}"
    ms = {
        label: results[("synthetic", label, "ms_per_step")][0]
        for label in ("UPGrad", "UPGrad (features)")
    }
    assert cells[5:] == [
        f"{ms['UPGrad']:.1f}",
        f"{ms['UPGrad (features)']:.1f}",
        f"{ms['UPGrad'] / ms['UPGrad (features)']:.2f}x",
    ]
    assert "Without a (features) row, as they weight the Jacobian itself" in printed
    assert "task k's gradient with respect to the trunk's output" in printed
    # One line of settings per method, not one more for its (features) row.
    assert printed.count("- UPGrad: `UPGrad(") == 1


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


def test_mean_ranks_by_hand() -> None:
    tasks = (Task("a", "binary"), Task("b", "binary"))
    metrics = [{"a": 0.9, "b": 0.5}, {"a": 0.8, "b": 0.5}, {"a": 0.7, "b": 0.6}]
    # Task a ranks the methods 1, 2, 3; task b ranks the third first and ties the others for
    # the ranks 2 and 3, 2.5 each.
    assert mean_ranks(metrics, tasks) == pytest.approx([(1 + 2.5) / 2, (2 + 2.5) / 2, (3 + 1) / 2])
    assert mean_ranks([{"a": 0.3, "b": 0.1}] * 4, tasks) == pytest.approx([2.5] * 4)
    assert mean_ranks([{"a": 0.3, "b": 0.1}], tasks) == pytest.approx([1.0])


ROW_NORMS = torch.tensor([8.0, 1.0, 1.0, 2.0])
"""The norms of the fake runs' Jacobian rows: the ranking's gradient is the largest."""


def _fake_run(
    method: str | None,
    seed: int,
    weights: list[float] | None,
    task: int | None,
    alpha: list[float] | None = None,
) -> Run:
    steps, metrics = 10, dict(zip(TASKS, (0.9, 0.8, 0.7, 0.6), strict=True))
    if task is not None:
        metrics = {TASKS[task]: 0.5}
    applied = None if weights is None else torch.tensor(weights).expand(steps, 4)
    return Run(
        job=Job("synthetic", seed, steps, method=method, task=task),
        metrics=metrics,
        seconds_per_step=0.001,
        losses=torch.ones(steps, 1 if task is not None else 4),
        weights=applied,
        shares=None if applied is None else update_shares(applied[0], ROW_NORMS).expand(steps, 4),
        alphas=None if alpha is None else torch.tensor(alpha).expand(steps, 4),
    )


def test_update_shares_by_hand() -> None:
    weights, norms = torch.tensor([0.5, -0.25, 0.25]), torch.tensor([1.0, 4.0, 0.0])
    # |w_k| ||g_k|| = 0.5, 1, 0 over a total of 1.5.
    torch.testing.assert_close(update_shares(weights, norms), torch.tensor([1 / 3, 2 / 3, 0.0]))
    torch.testing.assert_close(update_shares(weights, torch.zeros(3)), torch.zeros(3))
    # Step by step along the last dimension; the weights' scale does not matter.
    steps = update_shares(torch.stack([weights, 3 * weights]), torch.stack([norms, norms]))
    torch.testing.assert_close(steps, torch.tensor([[1 / 3, 2 / 3, 0.0]]).expand(2, 3))
    assert balance(torch.tensor([[0.1, -0.4, 0.2]])).tolist() == pytest.approx([0.25])


@pytest.mark.parametrize(("nash_balance", "verdict"), [(0.03, "reproduced"), (0.3, "NOT")])
def test_the_report_checks_the_paper_and_explains_a_collapse(
    nash_balance: float, verdict: str
) -> None:
    workload = load_workload("synthetic", 0)
    names = ("golden_pendulum", "nash_mtl", "excess_mtl")
    methods = {"synthetic": [build_method(name, workload, 10) for name in names]}
    alpha = [0.1, 0.15, 0.3, 0.45]  # 0.1 / 0.45 = 0.222
    # Golden Pendulum without a conflict applies w = α / ||g||: (0.0125, 0.15, 0.3, 0.225).
    golden = torch.tensor(alpha) / ROW_NORMS
    weights = {
        "golden_pendulum": (golden / golden.sum()).tolist(),
        "nash_mtl": [0.5 * nash_balance, 0.2, 0.3, 0.5],
        "excess_mtl": [0.97, 0.01, 0.01, 0.01],
    }
    runs = [
        _fake_run(name, seed, weights[name], None, alpha if name == "golden_pendulum" else None)
        for name in names
        for seed in (0, 1)
    ]
    runs += [_fake_run(None, seed, None, task) for task in range(4) for seed in (0, 1)]
    report = markdown_report(summarize([workload], methods, runs), steps=10, jobs=1)
    assert (
        "α balance (paper's check), 4 tasks with a 300x loss disparity: GoldenPendulum's "
        "α_min/α_max, its QP solution (weights on the normalised gradients), 0.222 ± 0.000 "
        "(paper 0.24); NashMTL's w_min/w_max, its weights on the raw gradients, "
        f"{nash_balance:.3f} ± 0.000 (paper 0.04): {verdict}" in report
    )
    # On the basis of every row, Golden Pendulum's weights have the balance 0.0125 / 0.3 and its
    # shares |w_k| ||g_k|| are α itself.
    assert "GoldenPendulum w_min/w_max 0.042, s_min/s_max 0.222" in report
    assert "| GoldenPendulum | 0.018 / 0.100 | 0.218 / 0.150 | 0.436 / 0.300 | 0.327 / 0.450 |" in (
        report
    )
    # Its weight 0.97 on the ranking task, whose gradient is the largest, is 0.995 of the update.
    assert (
        "ExcessMTL collapses onto 'ranking' on synthetic (largest weight 0.97, share of the "
        "update 0.99): ExcessMTL" in report
    )
    assert "| single-task baselines | 0.500 ± 0.000 |" in report
    assert "| +50.00 ± 0.00 |" in report  # ((0.9 + 0.8 + 0.7 + 0.6) / 4 - 0.5) / 0.5


def test_the_shares_come_from_the_trunk_gradients_of_each_step() -> None:
    """The first step's shares under Mean are the norms of the tasks' trunk gradients."""

    job = Job("synthetic", 1, 2, method="mean")
    workload = load_workload("synthetic", job.seed)
    run = run_job(job)
    assert run.weights is not None
    assert run.shares is not None
    assert run.alphas is None

    torch.manual_seed(job.seed)  # the run's initialisation and first batch, rebuilt
    network = MultiTaskNetwork(workload.train_inputs.shape[1], workload.tasks)
    batch = _batches(workload, job, torch.device("cpu"))[0]
    _, outputs = network(workload.train_inputs[batch])
    targets = workload.train_targets[batch].T
    norms = []
    for task, output, target in zip(workload.tasks, outputs, targets, strict=True):
        gradients = torch.autograd.grad(
            task.loss(output, target), list(network.trunk.parameters()), retain_graph=True
        )
        norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in gradients])))
    expected = torch.stack(norms) / torch.stack(norms).sum()
    tolerance = 16 * 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(run.shares[0], expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(run.weights, torch.full_like(run.weights, 0.25))


def test_without_pcgrad_golden_pendulums_shares_are_its_alpha() -> None:
    """w_k = α_k / ||g_k|| without the PCGrad pass, so that |w_k| ||g_k|| is α_k."""

    workload = load_workload("synthetic", 0)
    job = Job("synthetic", 0, 3, method="golden_pendulum")
    method = Method("golden_pendulum", "GP", GoldenPendulum(pcgrad=False), SETTINGS["Mean"])
    run = _train_method(workload, job, method, torch.device("cpu"))
    assert run.shares is not None
    assert run.alphas is not None
    tolerance = 16 * 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(run.shares, run.alphas, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(run.shares, run.weights)  # the gradients' norms differ


def test_constant_and_a_method_without_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Constant gets equal weights; GradDrop applies none, and shows a dash instead."""

    main(
        [
            "compare",
            "--methods",
            "constant,graddrop",
            "--workload",
            "synthetic",
            "--steps",
            "2",
            "--seeds",
            "1",
            "--jobs",
            "1",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    results = _results(tmp_path / "results.csv")
    assert results[("synthetic", "Constant([0.25, 0.25, 0.25, 0.25])", "ranking weight")] == (
        pytest.approx((0.25, 0.0))
    )
    assert ("synthetic", "GradDrop", "hedge R2") in results
    assert not [key for key in results if key[1] == "GradDrop" and "weight" in key[2]]
    assert not [key for key in results if key[1] == "GradDrop" and "share" in key[2]]
    main_row, weights_row = [
        line for line in printed.splitlines() if line.startswith("| GradDrop |")
    ]
    assert main_row.count("| — ") == 3  # both balances and the largest share
    assert weights_row == "| GradDrop | — | — | — | — |"  # each task's weight and share
    assert (tmp_path / "synthetic.png").read_bytes().startswith(b"\x89PNG")


def test_a_method_without_weights_shows_a_dash_in_its_figure() -> None:
    workload = load_workload("synthetic", 0)
    methods = {"synthetic": [build_method("graddrop", workload, 4)]}
    runs = [run_job(Job("synthetic", 0, 4, method="graddrop"))]
    runs += [run_job(Job("synthetic", 0, 4, task=k)) for k in range(4)]
    summaries = summarize([workload], methods, runs)
    plt = _pyplot()
    figure = _workload_figure(plt, summaries)
    texts = [text.get_text() for axis in figure.axes for text in axis.texts]
    plt.close(figure)
    assert texts.count("—\nno task weights") == 2  # its weights' and its shares' panels


TWELVE = tuple(Task(f"t{k}", "binary") for k in range(12))
"""More tasks than the tables give a column each."""


def _twelve_tasks() -> Workload:
    inputs, targets = torch.zeros(5, 2), torch.zeros(5, 12)
    return Workload("twelve", "12 binary tasks", TWELVE, inputs, targets, inputs, targets, "here")


def _twelve_task_runs(seed: int) -> list[Run]:
    steps = 10
    # UPGrad beats Mean on 10 tasks of 12 and ties on the last two.
    upgrad = {t.name: 0.9 if k < 10 else 0.8 for k, t in enumerate(TWELVE)}
    weights = torch.full((12,), 0.79 / 10)
    weights[4], weights[7] = 0.2, 0.01
    runs = []
    for method, metrics, applied in (
        ("mean", dict.fromkeys(upgrad, 0.8), torch.full((12,), 1 / 12)),
        ("upgrad", upgrad, weights),
    ):
        runs.append(
            Run(
                job=Job("twelve", seed, steps, method=method),
                metrics=metrics,
                seconds_per_step=0.001,
                losses=torch.ones(steps, 12),
                weights=applied.expand(steps, 12),
                shares=update_shares(applied, torch.ones(12)).expand(steps, 12),
            )
        )
    for k, task in enumerate(TWELVE):
        runs.append(
            Run(
                job=Job("twelve", seed, steps, task=k),
                metrics={task.name: 0.8},
                seconds_per_step=0.001,
                losses=torch.ones(steps, 1),
                weights=None,
                shares=None,
            )
        )
    return runs


def test_a_workload_with_many_tasks_gets_compact_tables_and_a_figure_without_legend() -> None:
    synthetic, twelve = load_workload("synthetic", 0), _twelve_tasks()
    methods = {
        "synthetic": [build_method("nash_mtl", synthetic, 10)],
        "twelve": [build_method(name, twelve, 10) for name in ("mean", "upgrad")],
    }
    runs = [_fake_run("nash_mtl", seed, [0.1, 0.2, 0.3, 0.4], None) for seed in (0, 1)]
    runs += [_fake_run(None, seed, None, task) for task in range(4) for seed in (0, 1)]
    runs += [run for seed in (0, 1) for run in _twelve_task_runs(seed)]
    summaries = summarize([synthetic, twelve], methods, runs)
    report = markdown_report(summaries, steps=10, jobs=1)

    assert "| method | mean accuracy (12 tasks) | Δm% vs single-task | mean rank |" in report
    # (10 x 0.9 + 2 x 0.8) / 12; 100 x 10 x 0.1 / 0.8 / 12; ranks (10 x 1 + 2 x 1.5) / 12.
    assert "| UPGrad | 0.883 ± 0.000 | +10.42 ± 0.00 | 1.08 ± 0.00 |" in report
    assert "| Mean | 0.800 ± 0.000 | +0.00 ± 0.00 | 1.92 ± 0.00 |" in report
    assert "| t0 w / s |" not in report
    assert "| UPGrad | 0.200 (t4) | 0.010 (t7) | 0.200 (t4) | 0.010 (t7) |" in report
    assert "| Mean | 0.083 (every task) | 0.083 (every task) | 0.083 (every task) |" in report
    assert "- On twelve (12 tasks) the tables give each metric's mean over the tasks" in report
    assert (
        "- NashMTL (solve every 20 steps) is left out of twelve (12 tasks) in the default run: "
        "each of its solves" in report
    )
    assert "| ranking w / s |" in report  # synthetic's four tasks keep a column each

    plt = _pyplot()
    figure = _workload_figure(plt, [s for s in summaries if s.workload.name == "twelve"])
    title = " ".join(text.get_text().replace("\n", " ") for text in figure.texts)
    curves = [len(axis.lines) for axis in figure.axes]
    colours = {str(line.get_color()) for axis in figure.axes for line in axis.lines}
    legends = len(figure.legends)
    plt.close(figure)
    assert legends == 0  # twelve entries would hide the title
    assert "one curve per task" in title
    assert curves == [12] * 6  # weights, shares and losses of each of the two methods
    assert len(colours) == 12


def test_a_large_weight_on_a_small_gradient_is_not_a_collapse() -> None:
    """Golden Pendulum's weights on the raw gradients: the share of the update tells."""

    workload = load_workload("synthetic", 0)
    methods = {"synthetic": [build_method("excess_mtl", workload, 10)]}
    # 0.95 on the classification (norm 1), 0.04 on the ranking (norm 8): shares 0.74 and 0.25.
    runs = [_fake_run("excess_mtl", seed, [0.04, 0.95, 0.005, 0.005], None) for seed in (0, 1)]
    runs += [_fake_run(None, seed, None, task) for task in range(4) for seed in (0, 1)]
    report = markdown_report(summarize([workload], methods, runs), steps=10, jobs=1)
    assert "| ExcessMTL | 0.040 / 0.249 | 0.950 / 0.739 |" in report
    assert "collapses" not in report


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
        ["--workloads", "digits,mnist"],
        ["--workloads", " , "],
        ["--workload", "digits", "--workloads", "digits"],
        ["--device", "nope"],
        ["--methods", "cagrad"],  # a required argument the command cannot choose
        ["--gramian-from", "feature"],
        ["--gramian-from", " , "],
        ["--methods", "mean,gcond", "--gramian-from", "features"],  # no Gramian weighting
    ],
)
def test_bad_options_are_usage_errors(arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *arguments, "--no-progress"])
    assert exit_info.value.code == 2


def _no_run(*_arguments: object, **_keywords: object) -> None:
    raise AssertionError("a run started")


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--output", "is a file, not a folder"),
        ("--output", "cannot be created"),  # a folder inside that file
        ("--device", "cannot be used here"),
    ],
)
def test_an_unusable_output_or_device_stops_before_any_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    option: str,
    named: str,
) -> None:
    monkeypatch.setattr(_cli, "_run", _no_run)
    monkeypatch.setattr(_cli, "load_workload", _no_run)
    a_file = tmp_path / "results"
    a_file.write_text("")
    value = {
        "is a file, not a folder": str(a_file),
        "cannot be created": str(a_file / "inside"),
        # CUDA on a CPU build, or the index after this machine's last GPU.
        "cannot be used here": f"cuda:{torch.cuda.device_count()}",
    }[named]
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--methods", "mean", option, value, "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"error: {option} {value!r}" in error
    assert named in error


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
        print(sorted({"matplotlib", "sklearn", "yaml", "omegaconf", "mnist1d"} & set(sys.modules)))
        """
    )
    assert loaded.stdout.strip() == "[]", loaded.stderr


@pytest.mark.parametrize(
    ("blocked", "arguments", "named"),
    [
        (("matplotlib", "sklearn", "tqdm"), [], "needs matplotlib, scikit-learn and tqdm,"),
        (("sklearn",), ["--no-progress"], "needs scikit-learn,"),
        (("mnist1d",), ["--no-progress", "--workloads", "many-tasks"], "needs mnist1d,"),
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
