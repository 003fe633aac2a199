r"""
The task groups of DynamicK: :class:`TaskGroup`, their checks, the blocks of rows a call's groups
take, and the groups and task names as a checkpoint carries them.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor

from .._state import decoded_task_names
from .._tasks import check_task_names
from .._validation import check_real

CATCH_ALL = "_ungrouped"
"""Name of the group that collects the tasks of a call that no group lists."""

GroupSpec: TypeAlias = "TaskGroup | Mapping[str, Any]"


def ordered_names(names: Iterable[Hashable]) -> tuple[Hashable, ...]:
    """
    ``names`` as a tuple: in the given order for a sequence, sorted for a set (by ``repr`` when
    the names cannot be compared), so that a set of names always gives the same order.
    """

    if not isinstance(names, set | frozenset):
        return tuple(names)
    try:
        return tuple(sorted(names))
    except TypeError:
        return tuple(sorted(names, key=repr))


@dataclass(frozen=True, init=False)
class TaskGroup:
    r"""
    Tasks balanced together by :class:`DynamicKWeighting`.

    Within a group the golden-ratio targets are assigned along :attr:`tasks`, the largest to the
    last: give a list to choose the order, or a set to have them sorted by name (as the
    reference does).

    :param name: The group's name (not ``"_ungrouped"``, the catch-all group's).
    :param tasks: The names of its tasks: a list or a set of distinct strings or integers (or
        tuples of them), as :attr:`DynamicKWeighting.tasks`.
    :param lam: Its own :math:`\lambda`, or ``None`` for the weighting's.
    """

    name: str
    tasks: tuple[Hashable, ...]
    lam: float | None

    def __init__(self, name: str, tasks: Iterable[Hashable] = (), lam: float | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Attribute `name` must be a non-empty string. Found name={name!r}.")
        if isinstance(tasks, str | bytes):
            raise ValueError(
                f"Attribute `tasks` of a task group must be a list or a set of task names, not the "
                f"string {tasks!r}, which would make a group of its characters. For one task, "
                f"write TaskGroup({name!r}, [{tasks!r}])."
            )
        ordered = ordered_names(tasks)
        check_distinct("tasks", ordered)
        check_task_names(list(ordered))  # the names a call's rows can have, which checkpoints carry
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "tasks", ordered)
        object.__setattr__(self, "lam", None if lam is None else check_real("lam", lam, low=0.0))

    @classmethod
    def of(cls, spec: GroupSpec) -> TaskGroup:
        """A group from a :class:`TaskGroup` or a mapping of its fields (as in a config file)."""

        if isinstance(spec, TaskGroup):
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise ValueError(f"A task group is a TaskGroup or a mapping of its fields. Found {spec!r}.")


def check_distinct(name: str, names: Sequence[Hashable]) -> None:
    try:
        distinct = len(set(names)) == len(names)
    except TypeError as error:
        raise ValueError(
            f"Attribute `{name}` must hold hashable names. Found {names!r}."
        ) from error
    if not distinct:
        raise ValueError(f"Attribute `{name}` must hold distinct names. Found {names!r}.")


def check_disjoint(groups: Sequence[TaskGroup]) -> None:
    owner: dict[Hashable, str] = {}
    for group in groups:
        for task in group.tasks:
            if task in owner:
                raise ValueError(
                    f"Attribute `groups` must give each task one group at most, but task {task!r} "
                    f"is in groups {owner[task]!r} and {group.name!r}. Take it out of one (with "
                    "`remove_task` to move it)."
                )
            owner[task] = group.name


def checked_groups(
    groups: Sequence[GroupSpec], shared_tasks_allowed: bool = False
) -> tuple[TaskGroup, ...]:
    """``groups`` as task groups, checked: distinct names, none the catch-all's, and (unless
    ``shared_tasks_allowed``) each task in one group at most."""

    if isinstance(groups, TaskGroup | Mapping | str):
        raise ValueError(f"Attribute `groups` must be a sequence of task groups. Found {groups!r}.")
    checked = tuple(TaskGroup.of(group) for group in groups)
    check_distinct("groups", [group.name for group in checked])
    if any(group.name == CATCH_ALL for group in checked):
        raise ValueError(
            f"Attribute `groups` must not hold a group named {CATCH_ALL!r}, the name of the "
            "group of the tasks that no group lists. Rename it."
        )
    if not shared_tasks_allowed:
        check_disjoint(checked)
    return checked


@dataclass(frozen=True)
class Block:
    """A group, and the rows of its tasks present in a call, in the group's order."""

    group: TaskGroup
    rows: tuple[int, ...]


def blocks_of(groups: Sequence[TaskGroup], names: Sequence[Hashable]) -> list[Block]:
    """
    The groups with a task among ``names`` (the rows of a call), in order, each with the rows of
    its tasks; then the catch-all group of the rows no group lists, sorted by name.
    """

    row_of = {name: row for row, name in enumerate(names)}
    blocks: list[Block] = []
    for group in groups:
        rows = tuple(row_of[t] for t in group.tasks if t in row_of)
        if rows:
            blocks.append(Block(group, rows))
    grouped = {names[row] for block in blocks for row in block.rows}
    ungrouped = ordered_names({name for name in names if name not in grouped})
    if ungrouped:
        blocks.append(Block(TaskGroup(CATCH_ALL), tuple(row_of[t] for t in ungrouped)))
    return blocks


def encoded_groups(groups: Sequence[TaskGroup], tasks: Sequence[Hashable] | None) -> Tensor:
    """The groups and the task names as JSON in a uint8 tensor (a checkpoint's extra state)."""

    state = {
        "groups": [[g.name, list(g.tasks), g.lam] for g in groups],
        "tasks": None if tasks is None else list(tasks),
    }
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def decoded_groups(
    state: Tensor, shared_tasks_allowed: bool
) -> tuple[tuple[TaskGroup, ...], list[Hashable] | None]:
    """The groups and the task names of :func:`encoded_groups`."""

    decoded = json.loads(bytes(state.tolist()))
    groups = checked_groups(
        [TaskGroup(name, decoded_task_names(tasks), lam) for name, tasks, lam in decoded["groups"]],
        shared_tasks_allowed,
    )
    return groups, None if decoded["tasks"] is None else decoded_task_names(decoded["tasks"])
