r"""
A phase of a curriculum (:class:`Phase`) and the checks of the task names that phases and losses
carry, so that a phase naming a task no loss carries cannot silently leave it untrained.

Reference: ``golden_pendulum.pro.Phase`` (``golden-pendulum-mtl`` 0.2.0).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..aggregation._validation import check_bool, check_int, check_real

PhaseCallback = Callable[[Any, "Phase"], object]
"""``on_enter`` / ``on_exit``: called with the curriculum's model (or ``None``) and the phase."""


@dataclass
class Phase:
    r"""
    A phase of a curriculum, with the fields (and defaults) of ``golden_pendulum.pro.Phase``.

    :param name: The phase's name.
    :param tasks: The names of the tasks trained in this phase (losses of other tasks are left
        out).
    :param steps: Number of training steps of the phase (at least 1).
    :param freeze_backbone: Whether the backbone's parameters stop requiring gradients.
    :param lam: The aggregator's :math:`\lambda` during the phase.
    :param lr: The learning rate after warm-up.
    :param pcgrad: Whether the aggregator resolves conflicts with PCGrad during the phase.
    :param warmup_steps: The learning rate rises linearly over the first ``warmup_steps`` steps:
        :math:`\text{lr} \cdot (s + 1) / \text{warmup\_steps}` at step :math:`s` of the phase.
    :param on_enter: Called as ``on_enter(model, phase)`` when the phase begins.
    :param on_exit: Called as ``on_exit(model, phase)`` when it ends.
    """

    name: str
    tasks: Collection[Hashable]
    steps: int
    freeze_backbone: bool = False
    lam: float = 0.5
    lr: float = 1e-4
    pcgrad: bool = True
    warmup_steps: int = 0
    on_enter: PhaseCallback | None = None
    on_exit: PhaseCallback | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"Attribute `name` must be a string. Found name={self.name!r}.")
        if isinstance(self.tasks, str) or not isinstance(self.tasks, Collection):
            raise ValueError(
                f"Attribute `tasks` must be a collection of task names. Found {self.tasks!r}."
            )
        check_int("steps", self.steps, low=1)
        check_bool("freeze_backbone", self.freeze_backbone)
        check_real("lam", self.lam, low=0.0)
        check_real("lr", self.lr, low=0.0)
        check_bool("pcgrad", self.pcgrad)
        check_int("warmup_steps", self.warmup_steps, low=0)
        for name in ("on_enter", "on_exit"):
            callback = getattr(self, name)
            if callback is not None and not callable(callback):
                raise ValueError(f"Attribute `{name}` must be callable. Found {callback!r}.")

    def learning_rate(self, phase_step: int) -> float:
        """The learning rate at step ``phase_step`` (from 0) of the phase, warm-up included."""

        if self.warmup_steps > 0 and phase_step < self.warmup_steps:
            return self.lr * (phase_step + 1) / self.warmup_steps
        return self.lr


def check_losses_cover(
    phase: Phase, losses: Mapping[Hashable, Tensor], tasks: Sequence[Hashable] | None
) -> None:
    """
    Checks the names of a step's ``losses`` for ``phase``: without ``tasks`` (every task the
    losses may carry), each of the phase's tasks needs a loss; with them, each loss needs a task
    among them.
    """

    if tasks is None:
        absent = [name for name in task_names(phase.tasks) if name not in losses]
        if absent:
            raise ValueError(
                f"Phase {phase.name!r} trains {task_names(phase.tasks)!r}, but no loss carries "
                f"{absent!r}: the losses are of {list(losses)!r}. Check the phase's task "
                "names; if some batches lack a task's loss, name every task with "
                "`Curriculum(..., tasks=...)`."
            )
        return
    unknown = [name for name in losses if name not in tasks]
    if unknown:
        raise ValueError(
            f"The losses carry {unknown!r}, which is not among the curriculum's tasks "
            f"{list(tasks)!r}: check the losses' names, or add them to `tasks`."
        )


def task_names(tasks: Collection[Hashable]) -> list[Hashable]:
    """The names of ``tasks`` in a stable order for messages (a phase's tasks may be a set)."""

    return sorted(tasks, key=str) if isinstance(tasks, Set) else list(tasks)


def known_tasks(
    tasks: Collection[Hashable] | None, phases: Sequence[Phase]
) -> tuple[Hashable, ...] | None:
    """``tasks`` as a tuple, checked to hold every phase's tasks (``None`` stays ``None``)."""

    if tasks is None:
        return None
    if isinstance(tasks, str) or not isinstance(tasks, Collection):
        raise ValueError(
            f"Parameter `tasks` must be a collection of task names. Found tasks={tasks!r}."
        )
    known = tuple(tasks)
    for phase in phases:
        unknown = [name for name in task_names(phase.tasks) if name not in known]
        if unknown:
            raise ValueError(
                f"Phase {phase.name!r} trains {unknown!r}, which is not among the tasks "
                f"{list(known)!r}: check the phase's task names."
            )
    return known
