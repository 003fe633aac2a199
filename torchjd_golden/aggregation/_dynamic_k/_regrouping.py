r"""
Automatic groups: the greedy grouping by cosine similarity, and what the host knows of the step
count that schedules it without reading the count at every call.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ._groups import TaskGroup


def similarity_groups(
    cosines: Sequence[Sequence[float]], names: Sequence[Hashable], threshold: float
) -> tuple[TaskGroup, ...]:
    """
    The reference's grouping: in row order, a task starts a group, and each later ungrouped task
    joins it if its cosine with every member is at least ``threshold``. The groups are named
    ``auto_group_0, ...`` and list their tasks sorted.
    """

    unassigned = list(range(len(names)))
    groups: list[TaskGroup] = []
    while unassigned:
        members = [unassigned.pop(0)]
        for j in list(unassigned):
            if all(cosines[i][j] >= threshold for i in members):
                members.append(j)
                unassigned.remove(j)
        groups.append(TaskGroup(f"auto_group_{len(groups)}", {names[i] for i in members}))
    return tuple(groups)


@dataclass(frozen=True)
class StepCountBounds:
    """
    What the host knows of the step count buffer without reading it: it lies in
    ``[low, high]`` (``high`` is ``None`` when nothing is known). A call counts a step only when
    it is finite, which the host does not read: it widens the interval instead, and reads the
    buffer only when a multiple of ``regroup_every`` falls inside it.
    """

    low: int = 0
    high: int | None = 0

    @property
    def exact(self) -> bool:
        return self.high == self.low

    def may_reach_multiple(self, every: int) -> bool:
        """Whether the count may be a multiple of ``every``."""
        return self.high is None or -(-self.low // every) * every <= self.high

    def after_call(self, finite: bool | None) -> StepCountBounds:
        """The bounds after a call, whose step is finite, not finite or unknown (``None``)."""
        if finite is None:  # counted or not: only the upper bound moves
            return StepCountBounds(self.low, None if self.high is None else self.high + 1)
        step = int(finite)
        return StepCountBounds(self.low + step, None if self.high is None else self.high + step)
