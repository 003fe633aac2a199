"""The ``torchjd-golden`` command."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ._compare import (
    DEFAULT_METHODS,
    MethodResult,
    build_methods,
    markdown_table,
    train,
    write_csv,
    write_plots,
)
from ._workloads import WORKLOADS

_COMPARE_HELP = """\
Train one small multi-task model per method and workload, then report for each method the test
metric of every task (R2 for regressions, accuracy for classifications), the mean balance
w_min/w_max of its task weights and its mean largest weight over the second half of training
(Golden Pendulum's weights are its QP solution, on normalised gradients, as its paper reports
them; other methods' are the weights jac_to_grad returns, normalised to unit total), and the
seconds per training step. Writes results.md, results.csv, weights.png and losses.png into the
output folder, and prints the tables.

Workloads: "synthetic" has four heads whose losses differ by about 300x (the setting of the
Golden Pendulum paper); "digits" is scikit-learn's bundled 8x8 digits as three tasks (class,
parity, size), so nothing is downloaded.
"""


def main(argv: Sequence[str] | None = None) -> int:
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
        "(default: %(default)s; nash_mtl is left out when cvxpy is missing)",
    )
    compare.add_argument(
        "--workload", choices=[*WORKLOADS, "all"], default="all", help="default: %(default)s"
    )
    compare.add_argument(
        "--steps", type=int, default=300, help="training steps (default: %(default)s)"
    )
    compare.add_argument(
        "--seed", type=int, default=0, help="seed of data and models (default: %(default)s)"
    )
    compare.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    compare.add_argument(
        "--output",
        type=Path,
        default=Path("compare-output"),
        help="folder for results.md, results.csv and the plots (default: %(default)s)",
    )
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    arguments = parser.parse_args(argv)

    if arguments.steps < 2:
        compare.error("--steps must be at least 2")
    names = [name.strip() for name in arguments.methods.split(",") if name.strip()]
    if not names:
        compare.error("--methods names no method")
    workloads = list(WORKLOADS) if arguments.workload == "all" else [arguments.workload]
    device = torch.device(arguments.device)

    # NashMTL's solver reports every parameterised problem it cannot cache; that is not news here.
    warnings.filterwarnings("ignore", module="torchjd.aggregation._nash_mtl")
    results: list[MethodResult] = []
    for workload_name in workloads:
        workload = WORKLOADS[workload_name](arguments.seed)
        try:
            methods, notes = build_methods(names, len(workload.tasks))
        except ValueError as error:
            compare.error(str(error))
        for note in notes:
            print(note, file=sys.stderr)
        for name, aggregator in methods:
            result = train(
                workload,
                name,
                aggregator,
                arguments.steps,
                arguments.seed,
                device,
                progress=not arguments.no_progress,
            )
            results.append(result)

    table = markdown_table(results)
    arguments.output.mkdir(parents=True, exist_ok=True)
    (arguments.output / "results.md").write_text(table)
    write_csv(results, arguments.output / "results.csv")
    plots = write_plots(results, arguments.output)
    print(table)
    print(
        f"Wrote {arguments.output / 'results.md'}, results.csv, {', '.join(p.name for p in plots)}"
    )
    return 0
