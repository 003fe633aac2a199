"""
All the benchmarks in one command: ``python -m benchmarks [--quick] [--gcond-reference PATH]``.

Sections: aggregation time against the floor and the references, cost growth, peak memory per
call, a full training step, GCond's accumulate-and-resolve step, and many tasks (m up to 512:
time, memory, growth and precision); see each module's docstring. Every ratio is measured within
one run; timings are medians.
"""

from __future__ import annotations

import argparse
import platform

import torch

from . import aggregation, gcond, step, tasks, training_step


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--gcond-reference", help="path to the official grad_conductor.py")
    parser.add_argument(
        "--sections",
        default="time,growth,memory,step,gcond,tasks,engine",
        help="comma-separated subset of time,growth,memory,step,gcond,tasks,engine (default: all)",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    repeat = 3 if args.quick else 7
    reference = gcond.load_reference(args.gcond_reference)

    print(
        f"# Benchmarks\n\n{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32\n"
    )
    if "time" in sections:
        sizes_m, sizes_n = (
            ([2, 8], [100_000, 1_000_000])
            if args.quick
            else ([2, 8, 16], [100_000, 1_000_000, 4_000_000])
        )
        aggregation.print_time_table(aggregation.time_table(sizes_m, sizes_n, repeat, reference))
    if "growth" in sections:
        aggregation.growth_table(repeat)
    if "memory" in sections:
        aggregation.memory_table(8, 1_000_000 if args.quick else 4_000_000)
    if "step" in sections:
        training_step.step_table(3 * repeat)  # a step is noisier than a call
    if "gcond" in sections:
        gcond.step_table(reference, repeat)
    if "tasks" in sections:
        tasks.run(args.quick, 3)
    if "engine" in sections:
        step.run(args.quick)


if __name__ == "__main__":
    main()
