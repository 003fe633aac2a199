"""The multi-task problems ``torchjd-golden compare`` trains on; nothing is downloaded."""

from collections.abc import Callable

from ._base import Task, TaskKind, Workload, split, split_indices
from ._digits import digits, multi_digits
from ._mnist1d import many_tasks, mnist1d
from ._synthetic import synthetic

WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "synthetic": synthetic,
    "digits": digits,
    "multi-digits": multi_digits,
    "mnist1d": mnist1d,
    "many-tasks": many_tasks,
}
"""Every workload by its name on the command line, in the order of the report."""

__all__ = [
    "WORKLOADS",
    "Task",
    "TaskKind",
    "Workload",
    "digits",
    "many_tasks",
    "mnist1d",
    "multi_digits",
    "split",
    "split_indices",
    "synthetic",
]
