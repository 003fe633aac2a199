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

from ..step import GramianSource
from ._methods import (
    DEFAULT_METHODS,
    GRAMIAN_SOURCES,
    NASH_MTL_DEFAULT_MAX_TASKS,
    Method,
    build_method,
    weights_the_gramian,
)
from ._plots import write_plots
from ._report import markdown_report, write_csv
from ._summary import summarize
from ._training import Job, Run, load_workload, run_job, start_worker
from ._workloads import WORKLOADS, Workload

INSTALL_HINT = "pip install 'torchjd-golden[compare]'"

# The modules of the ``compare`` extra, by the name pip knows them under.
_PLOTS = {"matplotlib": "matplotlib"}
_PROGRESS = {"tqdm": "tqdm"}
_WORKLOAD_MODULES = {
    "digits": {"scikit-learn": "sklearn"},
    "multi-digits": {"scikit-learn": "sklearn"},
    "mnist1d": {"mnist1d": "mnist1d"},
    "many-tasks": {"mnist1d": "mnist1d"},
}

STEPS, QUICK_STEPS = 300, 150
SEEDS, QUICK_SEEDS = 2, 1

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

Workloads (nothing is downloaded): "synthetic" has four heads whose losses differ by about 300x
(the setting of the Golden Pendulum paper); "digits" is scikit-learn's bundled 8x8 digits as
three tasks (class, parity, size); "multi-digits" overlays two of those digits as MultiMNIST does
(Sener & Koltun, 2018) and classifies the left and the right one; "mnist1d" is MNIST-1D, made by
the mnist1d package, as its class and three latent variables of its generator (shift, shear,
noise level), whose losses start 5x10^5 apart; "many-tasks" is 40 binary attributes of
MNIST-1D, as CelebA has 40. Each method's mean rank over the tasks is beside its Delta_m%.

Every method trains through torchjd_golden.JacobianDescent with the weights from the Jacobian of
the trunk's parameters (gramian_from="parameters", the exact method), and each method that
weights the Gramian (Golden Pendulum, GABA, UPGrad, ...) a second time with the weights from the
Gramian of the tasks' gradients with respect to the trunk's output (gramian_from="features", its
row "<method> (features)"); a table under the others sets the two side by side: what the fast
step costs in Delta_m% and saves in time per step. --gramian-from parameters runs the exact
step only.
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
        help="comma-separated aggregator names, any that aggregator_from_config knows "
        f"(default: {','.join(DEFAULT_METHODS)}, NashMTL only on workloads of at most "
        f"{NASH_MTL_DEFAULT_MAX_TASKS} tasks)",
    )
    chosen = compare.add_mutually_exclusive_group()
    chosen.add_argument(
        "--workloads",
        help=f"comma-separated workloads, any of {','.join(WORKLOADS)} (default: all of them)",
    )
    chosen.add_argument(
        "--workload",
        choices=[*WORKLOADS, "all"],
        help="one workload, or all of them (--workloads names several)",
    )
    compare.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look: {QUICK_SEEDS} seed and {QUICK_STEPS} steps unless --seeds or "
        "--steps say otherwise",
    )
    compare.add_argument(
        "--steps",
        type=int,
        help=f"training steps per run (default: {STEPS}, {QUICK_STEPS} with --quick)",
    )
    compare.add_argument(
        "--seeds",
        type=int,
        help="number of seeds, 0 to N-1, each a data split, initialisation and batch order "
        f"(default: {SEEDS}, {QUICK_SEEDS} with --quick)",
    )
    compare.add_argument(
        "--jobs",
        type=int,
        default=_available_cpus(),
        help="runs trained at a time, each in its own process with one thread "
        "(default: the CPUs available, %(default)s)",
    )
    compare.add_argument(
        "--gramian-from",
        default="parameters,features",
        help="comma-separated sources of the weights, parameters (exact, every method) and "
        "features (the feature Gramian, the methods that weight the Gramian only) "
        "(default: %(default)s)",
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
    names, workload_names, sources = _checked_options(compare, arguments)
    modules = dict(_PLOTS)
    for name in workload_names:
        modules |= _WORKLOAD_MODULES.get(name, {})
    _require(modules | ({} if arguments.no_progress else _PROGRESS))

    workloads = [load_workload(name, 0) for name in workload_names]
    methods: dict[str, list[Method]] = {}
    for workload in workloads:
        try:
            methods[workload.name] = [
                build_method(name, workload, arguments.steps, gramian_from=source)
                for name in names
                for source in sources
                if source == "parameters" or _weights_the_gramian(name, workload)
            ]
        except ValueError as error:
            compare.error(str(error))
        except ImportError:  # torchjd's NashMTL without its solver
            _exit_missing(["cvxpy"], for_what=" for NashMTL")
        if not methods[workload.name]:
            compare.error(
                "--gramian-from features needs a method that weights the Gramian: "
                f"{', '.join(names)} weight the Jacobian itself"
            )
        labels = [method.label for method in methods[workload.name]]
        if len(set(labels)) < len(labels):
            compare.error(f"--methods names one method twice: {', '.join(labels)}")
        if arguments.methods is None:
            methods[workload.name] = [
                m for m in methods[workload.name] if m.settings.in_default_run(workload)
            ]

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


def _checked_options(
    compare: argparse.ArgumentParser, arguments: argparse.Namespace
) -> tuple[list[str], list[str], list[GramianSource]]:
    """
    The method and the workload names and the sources of the weights the options give, with
    ``--quick``'s steps and seeds filled in; a usage error, before any run, for an option that
    cannot work.
    """

    if arguments.steps is None:
        arguments.steps = QUICK_STEPS if arguments.quick else STEPS
    if arguments.seeds is None:
        arguments.seeds = QUICK_SEEDS if arguments.quick else SEEDS

    for option in ("steps", "seeds", "jobs"):
        if getattr(arguments, option) < (2 if option == "steps" else 1):
            compare.error(f"--{option} is too small: {getattr(arguments, option)}")
    given = ",".join(DEFAULT_METHODS) if arguments.methods is None else arguments.methods
    names = list(dict.fromkeys(n.strip() for n in given.split(",") if n.strip()))
    if not names:
        compare.error("--methods names no method")
    problem = _device_problem(arguments.device) or _output_problem(arguments.output)
    if problem:
        compare.error(problem)
    workload_names = _workload_names(arguments)
    if isinstance(workload_names, str):
        compare.error(workload_names)
    given_sources = [n.strip() for n in arguments.gramian_from.split(",") if n.strip()]
    sources = [source for source in GRAMIAN_SOURCES if source in given_sources]
    unknown = [source for source in given_sources if source not in GRAMIAN_SOURCES]
    if unknown or not sources:
        compare.error(
            f"--gramian-from {arguments.gramian_from!r}: choose from {', '.join(GRAMIAN_SOURCES)}"
        )
    return names, workload_names, sources


def _weights_the_gramian(name: str, workload: Workload) -> bool:
    """Whether the method ``name`` has a step from the feature Gramian."""

    return weights_the_gramian(build_method(name, workload, STEPS).aggregator)


def _workload_names(arguments: argparse.Namespace) -> list[str] | str:
    """The workloads to run, in the order named, or why the options name none."""

    if arguments.workload is not None:
        return list(WORKLOADS) if arguments.workload == "all" else [arguments.workload]
    if arguments.workloads is None:
        return list(WORKLOADS)
    names = list(dict.fromkeys(n.strip() for n in arguments.workloads.split(",") if n.strip()))
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        return (
            f"--workloads names an unknown workload {unknown[0]!r}: choose from "
            f"{', '.join(WORKLOADS)}"
        )
    return names or "--workloads names no workload"


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
    """
    Every run of the comparison, longest first so that the workers finish together: the slowest
    methods (NashMTL's solver), then the others on the workloads with the most tasks, the
    baselines last.
    """

    common = {"steps": arguments.steps, "device": arguments.device}
    jobs = []
    n_tasks = {name: len(load_workload(name, 0).tasks) for name in methods}
    for workload_name, of_workload in methods.items():
        for seed in range(arguments.seeds):
            jobs += [
                Job(workload_name, seed, method=m.name, gramian_from=m.gramian_from, **common)
                for m in of_workload
            ]
            jobs += [
                Job(workload_name, seed, task=k, **common) for k in range(n_tasks[workload_name])
            ]
    slow = {m.name for of_workload in methods.values() for m in of_workload if m.settings.slow}
    return sorted(
        jobs,
        key=lambda job: (job.method not in slow, job.task is not None, -n_tasks[job.workload]),
    )


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
        # Built here once: the workers neither import their packages nor make their data again.
        workloads = {(j.workload, j.seed): load_workload(j.workload, j.seed) for j in jobs}
        with ProcessPoolExecutor(
            workers, context, initializer=start_worker, initargs=(workloads,)
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
