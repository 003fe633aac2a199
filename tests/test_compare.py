"""The ``torchjd-golden compare`` command and the comparison it runs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from torchjd_golden._cli import main
from torchjd_golden._compare import build_methods


def _rows(path: Path) -> dict[tuple[str, str, str], float]:
    with path.open() as file:
        return {
            (r["workload"], r["method"], r["quantity"]): float(r["value"])
            for r in csv.DictReader(file)
        }


def test_a_small_run_writes_the_table_the_csv_and_the_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "compare",
            "--methods",
            "golden_pendulum,mean,gaba",
            "--workload",
            "synthetic",
            "--steps",
            "40",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| GoldenPendulum |" in printed
    assert "ranking (R2)" in printed
    assert (tmp_path / "results.md").read_text() in printed
    for picture in ("weights.png", "losses.png"):
        assert (tmp_path / picture).read_bytes().startswith(b"\x89PNG")

    rows = _rows(tmp_path / "results.csv")
    assert rows[("synthetic", "Mean", "balance_ratio")] == pytest.approx(1.0)
    assert rows[("synthetic", "Mean", "largest_weight")] == pytest.approx(0.25)
    # Golden Pendulum's QP stays near the golden targets: w_min / w_max close to 1/phi^3.
    assert rows[("synthetic", "GoldenPendulum", "balance_ratio")] == pytest.approx(0.236, abs=0.05)
    assert rows[("synthetic", "GABA", "balance_ratio")] == pytest.approx(1.0)  # still in warm-up
    assert 0.0 <= rows[("synthetic", "GABA", "classification accuracy")] <= 1.0
    assert rows[("synthetic", "GoldenPendulum", "seconds_per_step")] > 0.0


def test_both_workloads_by_default(tmp_path: Path) -> None:
    main(
        ["compare", "--methods", "mean", "--steps", "4", "--output", str(tmp_path), "--no-progress"]
    )
    rows = _rows(tmp_path / "results.csv")
    assert ("synthetic", "Mean", "hedge R2") in rows
    assert ("digits", "Mean", "class accuracy") in rows


def test_an_unknown_method_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--methods", "golden_pendulum,nope", "--steps", "2", "--no-progress"])
    assert exit_info.value.code == 2
    assert "Unknown aggregator 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments", [["--steps", "1"], ["--methods", " , "], ["--workload", "mnist"]]
)
def test_bad_options_are_usage_errors(arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *arguments, "--no-progress"])
    assert exit_info.value.code == 2


def test_nash_mtl_gets_its_task_count_and_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    methods, notes = build_methods(["mean", "nash_mtl"], n_tasks=3)
    if notes:  # cvxpy is not installed: NashMTL is left out with a note
        assert "nash_mtl skipped" in notes[0]
        assert [name for name, _ in methods] == ["Mean"]
    else:
        assert [name for name, _ in methods] == ["Mean", "NashMTL"]
        assert methods[1][1].n_tasks == 3  # type: ignore[union-attr]


def test_help_explains_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torchjd_golden", "compare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in (
        "--methods",
        "--workload",
        "--steps",
        "--seed",
        "--device",
        "--output",
        "balance",
    ):
        assert option in result.stdout


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
            "--output",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| Mean |" in result.stdout
