"""
Task names: the extra input ``tasks`` that says which task each row of the coming calls is.

A stateful method keys its per-task state by these names (see :class:`~._state.LazyState`), so
that a task absent from a call keeps its state, a new one starts afresh and a new order follows
the names. The names travel in checkpoints, which ``torch.load(weights_only=True)`` reads back:
they are strings or integers (or tuples of them).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from types import FrameType

import torch
import torchjd
from torch import Tensor
from torchjd.aggregation import Aggregator

TaskNames = tuple[Hashable, ...]

# Frames in these folders are not the user's: a warning points at the first frame outside them.
_INTERNAL_FOLDERS = tuple(
    str(Path(module.__file__).parent)
    for module in (torch, torchjd, sys.modules[__name__.rpartition(".")[0]])
    if module.__file__ is not None
)


def check_task_names(value: object) -> TaskNames | None:
    """Returns ``value`` as a tuple of distinct task names (``None`` stays ``None``)."""

    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | torch.Size):
        raise ValueError(
            "Attribute `tasks` must be a sequence of task names (strings or integers), one per row "
            f"of the coming calls, or None. Found tasks={value!r}."
        )
    names = tuple(value)
    for name in names:
        if not _checkpointable(name):
            raise ValueError(
                "Attribute `tasks` must hold strings or integers (or tuples of them), which "
                f"checkpoints can carry. Found {name!r} of type {type(name).__name__}."
            )
    if len(set(names)) != len(names):
        repeated = sorted({str(name) for name in names if names.count(name) > 1})
        raise ValueError(
            f"Attribute `tasks` must hold distinct names, each task once. Repeated: {repeated}."
        )
    return names


def default_task_names(m: int) -> tuple[str, ...]:
    """The names of ``m`` unnamed rows where names are shown: ``task_0`` ... ``task_{m-1}``."""

    return tuple(f"task_{k}" for k in range(m))


def set_step_inputs(
    aggregator: Aggregator, tasks: Sequence[Hashable] | None, losses: Tensor | None
) -> None:
    """
    Gives ``aggregator`` the extra inputs of the coming step that it takes, as its own
    documentation says: the rows' task names (``tasks``) and the task losses (``losses``, when
    given).
    """

    if hasattr(type(aggregator), "tasks"):
        setattr(aggregator, "tasks", tasks)  # noqa: B010 - a property of some aggregators
    if hasattr(type(aggregator), "losses") and losses is not None:
        setattr(aggregator, "losses", losses)  # noqa: B010


def _checkpointable(name: object) -> bool:
    if isinstance(name, tuple):
        return all(_checkpointable(part) for part in name)
    return isinstance(name, str) or (isinstance(name, int) and not isinstance(name, bool))


class NamedTasks:
    """Mixin giving a weighting the ``tasks`` input: names kept until changed, checked per call."""

    _tasks: TaskNames | None = None

    @property
    def tasks(self) -> TaskNames | None:
        """
        The names of the tasks of the coming calls, one per row of the input (``None``: tasks
        are known by their row index). Kept until changed.
        """
        return self._tasks

    @tasks.setter
    def tasks(self, value: Sequence[Hashable] | None) -> None:
        self._tasks = check_task_names(value)

    def _call_tasks(self, m: int) -> TaskNames | None:
        """The task names of a call on ``m`` rows, checked against ``m``."""

        names = self._tasks
        if names is not None and len(names) != m:
            raise ValueError(
                f"`{type(self).__name__}` was told {len(names)} task names "
                f"({', '.join(map(repr, names[:5]))}{', ...' if len(names) > 5 else ''}) but "
                f"received {m} rows. Set `.tasks` to the names of this call's rows."
            )
        return names


def warn_user(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside torch, torchjd and this package."""

    warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    # Level 1 is warn_user itself, level 2 its caller, and so on up the stack.
    level, frame = 2, sys._getframe(2)
    frame_or_none: FrameType | None = frame
    while frame_or_none is not None and frame_or_none.f_code.co_filename.startswith(
        _INTERNAL_FOLDERS
    ):
        level, frame_or_none = level + 1, frame_or_none.f_back
    return level
