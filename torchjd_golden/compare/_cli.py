"""The ``torchjd-golden`` command: ``torchjd-golden compare``."""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch

from ._methods import DEFAULT_METHODS, Method, build_method
from ._plots import write_plots
from ._report import markdown_report, write_csv
from ._summary import summarize
from ._training import Job, Run, load_workload, run_job
from ._workloads import WORKLOADS

INSTALL_HINT = "pip install 'torchjd-golden[compare]'"

# The modules of the ``compare`` extra, by the name pip knows them under.
_PLOTS = {"matplotlib": "matplotlib"}
_DIGITS = {"scikit-learn": "sklearn"}
_PROGRESS = {"tqdm": "tqdm"}

_COMPARE_HELP = """\
Train one small multi-task model per method, workload and seed, and the single-task baselines,
then report for each method the test metric of every task (R2 for regressions, accuracy for
classifications) and Delta_m% against the single-task baselines, as mean +- std over seeds; the
task weights w_k it applied (those jac_to_grad returns, normalised to unit total) and each task's
share of the update s_k = |w_k| ||g_k|| / sum_j |w_j| ||g_j||, with the balance min/max of each,
over the second half of training ("-" for a method that applies no weights); Golden Pendulum's
alpha balance, the quantity its paper reports, in the check under the tables; and the
milliseconds per training step. Each method runs with the settings of its paper or reference,
listed under the tables.
Writes results.md, results.csv, runs.csv (one row per seed), a figure per workload and
summary.png into the output folder, and prints the tables.

Workloads: "synthetic" has four heads whose losses differ by about 300x (the setting of the
Golden Pendulum paper); "digits" is scikit-learn's bundled 8x8 digits as three tasks (class,
parity, size), so nothing is downloaded.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``torchjd-golden`` with ``argv`` (default: the command line); returns the status."""

    parser = argparse.ArgumentParser(
        prog="torchjd-golden",
        description="Multi-task gradient-balancing methods for torchjd.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    compare = commands.add_parser(
        "compare",
        help="compare methods on small multi-task problems",
        description=_COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated aggregator names, any that aggregator_from_config knows "
        "(default: %(default)s)",
    )
    compare.add_argument(
        "--workload", choices=[*WORKLOADS, "all"], default="all", help="default: %(default)s"
    )
    compare.add_argument(
        "--steps", type=int, default=300, help="training steps per run (default: %(default)s)"
    )
    compare.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="number of seeds, 0 to N-1, each a data split, initialisation and batch order "
        "(default: %(default)s)",
    )
    compare.add_argument(
        "--jobs",
        type=int,
        default=_available_cpus(),
        help="runs trained at a time, each in its own process with one thread "
        "(default: the CPUs available, %(default)s)",
    )
    compare.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    compare.add_argument(
        "--output",
        type=Path,
        default=Path("compare-output"),
        help="folder for results.md, results.csv, runs.csv and the figures (default: %(default)s)",
    )
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    arguments = parser.parse_args(argv)

    for option in ("steps", "seeds", "jobs"):
        if getattr(arguments, option) < (2 if option == "steps" else 1):
            compare.error(f"--{option} is too small: {getattr(arguments, option)}")
    names = list(dict.fromkeys(n.strip() for n in arguments.methods.split(",") if n.strip()))
    if not names:
        compare.error("--methods names no method")
    problem = _device_problem(arguments.device) or _output_problem(arguments.output)
    if problem:
        compare.error(problem)
    workload_names = list(WORKLOADS) if arguments.workload == "all" else [arguments.workload]
    _require(
        _PLOTS
        | (_DIGITS if "digits" in workload_names else {})
        | ({} if arguments.no_progress else _PROGRESS)
    )

    workloads = [load_workload(name, 0) for name in workload_names]
    methods: dict[str, list[Method]] = {}
    for workload in workloads:
        try:
            methods[workload.name] = [build_method(n, workload, arguments.steps) for n in names]
        except ValueError as error:
            compare.error(str(error))
        except ImportError:  # torchjd's NashMTL without its solver
            _exit_missing(["cvxpy"], for_what=" for NashMTL")
        labels = [method.label for method in methods[workload.name]]
        if len(set(labels)) < len(labels):
            compare.error(f"--methods names one method twice: {', '.join(labels)}")

    jobs = _jobs(methods, arguments)
    start = time.perf_counter()
    runs = _run(jobs, arguments.jobs, progress=not arguments.no_progress)
    elapsed = time.perf_counter() - start

    summaries = summarize(workloads, methods, runs)
    report = markdown_report(summaries, arguments.steps, min(arguments.jobs, len(jobs)))
    arguments.output.mkdir(parents=True, exist_ok=True)
    (arguments.output / "results.md").write_text(report)
    written = [arguments.output / "results.md"]
    written += write_csv(summaries, arguments.output)
    written += write_plots(summaries, arguments.output)
    print(report)
    print(f"{len(jobs)} runs in {elapsed:.0f} s. Wrote {', '.join(str(p) for p in written)}.")
    return 0


def _device_problem(name: str) -> str | None:
    """Why the runs could not use the device ``name``, found before any run starts."""

    try:
        # A round trip, so that a device this build or machine lacks (CUDA on a CPU build, an
        # index past the last GPU, "meta") fails here rather than in every worker.
        torch.zeros(1, device=torch.device(name)).cpu()
    except (RuntimeError, AssertionError) as error:
        return f"--device {name!r} cannot be used here: {str(error).splitlines()[0]}"
    return None


def _output_problem(path: Path) -> str | None:
    """Why the results could not be written into the folder ``path``, found before any run."""

    if path.exists():
        if not path.is_dir():
            return f"--output {str(path)!r} is a file, not a folder"
        writable = path
    else:
        writable = next(parent for parent in path.absolute().parents if parent.exists())
        if not writable.is_dir():
            return f"--output {str(path)!r} cannot be created: {str(writable)!r} is a file"
    if not os.access(writable, os.W_OK | os.X_OK):
        return f"--output {str(path)!r}: {str(writable)!r} is not writable"
    return None


def _available_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _require(modules: dict[str, str]) -> None:
    """Exits with one line naming the extra when a module of the run is not installed."""

    missing = [package for package, module in modules.items() if not _installed(module)]
    if missing:
        _exit_missing(missing)


def _installed(module: str) -> bool:
    # Finds the module without importing it (None also where sys.modules blocks it with None).
    return importlib.util.find_spec(module) is not None


def _exit_missing(packages: Sequence[str], for_what: str = "") -> NoReturn:
    """One line, no traceback: what is missing and the extra that brings it."""

    names = ", ".join(packages[:-1]) + " and " * (len(packages) > 1) + packages[-1]
    print(
        f"torchjd-golden compare needs {names}{for_what}, not installed here: {INSTALL_HINT}",
        file=sys.stderr,
    )
    raise SystemExit(1)


def _jobs(methods: dict[str, list[Method]], arguments: argparse.Namespace) -> list[Job]:
    """Every run of the comparison, the slowest (NashMTL's solver) first, the baselines last."""

    common = {"steps": arguments.steps, "device": arguments.device}
    jobs = []
    for workload_name, of_workload in methods.items():
        n_tasks = len(load_workload(workload_name, 0).tasks)
        for seed in range(arguments.seeds):
            jobs += [Job(workload_name, seed, method=m.name, **common) for m in of_workload]
            jobs += [Job(workload_name, seed, task=k, **common) for k in range(n_tasks)]
    slow = {m.name for of_workload in methods.values() for m in of_workload if m.settings.slow}
    return sorted(jobs, key=lambda job: (job.method not in slow, job.task is not None))


def _run(jobs: Sequence[Job], workers: int, progress: bool) -> list[Run]:
    """Runs ``jobs`` in ``workers`` fresh processes (in this one for 1), in any order."""

    workers = min(workers, len(jobs))
    with _progress_bar(len(jobs), progress) as advance:
        if workers == 1:
            with _one_thread():
                return [_then(advance, run_job(job)) for job in jobs]
        # Fresh interpreters ("spawn"): forking a process that holds torch's thread pools can
        # deadlock, and the runs must not depend on what this process did before.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, context, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            futures = [pool.submit(run_job, job) for job in jobs]
            return [_then(advance, future.result()) for future in as_completed(futures)]


def _then(advance: Callable[[], None], run: Run) -> Run:
    advance()
    return run


@contextmanager
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from tqdm.auto import tqdm  # noqa: PLC0415 - an optional dependency

    with tqdm(total=total, desc="torchjd-golden compare", unit="run", leave=False) as bar:
        yield bar.update
