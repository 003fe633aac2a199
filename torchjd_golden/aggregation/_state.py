"""
State kept by the stateful weightings: buffers sized by the first input, saved and restored by
``state_dict``, never changed by a step whose input is not finite, and keyed by task name when
the caller names the tasks.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchjd import Stateful

from ._migrations import CheckpointMigrations
from ._tasks import NamedTasks, TaskNames, warn_user


class LazyState(CheckpointMigrations, Stateful):
    """
    Mixin for a module whose state tensors are created on the first call, once the number of
    tasks is known.

    Each name in :attr:`_state_names` is a registered buffer, so ``.to()``, ``state_dict()`` and
    ``torch.load(weights_only=True)`` carry all of it. Before the first call the buffers are
    empty; a checkpoint loads into a fresh instance by taking the saved shapes. Subclasses build
    the initial state in :meth:`_initial_state`; the leading dimensions of the first buffer are
    the input's sizes the state depends on (the number of tasks, and for some methods the number
    of parameters).

    **Tasks by name** (with :class:`~._tasks.NamedTasks` mixed in before this class). The buffers
    in :attr:`_per_task_names` hold one row per *known* task (their first dimension). Without
    names, the known tasks are the rows of the input, and a change of
    their number resets the state with a warning. Once the caller names the tasks (``tasks``),
    each name owns a row: :meth:`_ensure_state` returns the rows of the call's tasks (``None``
    when they are all the known tasks in order), a new name gets a row of the initial per-task
    state, and the other rows are left untouched until their task returns. The names of the
    rows travel in the checkpoint (the module's extra state).

    **The meta device.** A state made on the meta device (by a call on meta input, or by moving
    the module there) has shapes but no values, and ``to_empty`` gives it uninitialised memory.
    Such a state is rebuilt, with a warning, by the first call on a real device, whether or not
    the module was moved with ``to_empty`` first.
    """

    _state_names: ClassVar[tuple[str, ...]]
    _per_task_names: ClassVar[tuple[str, ...]] = ()
    # Whether the state keeps the dtype it was built in, whatever the later inputs' (converted to
    # it): for averages of scale-free quantities, which a float64 Gramian of an overflowing
    # float32 Jacobian must not reset. Otherwise a change of dtype rebuilds the state.
    _keeps_state_dtype: ClassVar[bool] = False
    _known_tasks: list[Hashable] | None = None  # the name of each per-task row, or None
    # Whether the state was made on (or moved to) the meta device: its values are undefined.
    _state_without_values: bool = False
    # State kept beside the buffers, which a checkpoint must hold with them (the module's extra
    # state, "_extra_state", for one that keeps Python values).
    _more_state_keys: ClassVar[tuple[str, ...]] = ()

    def _register_state(self) -> None:
        for name in self._state_names:
            self.register_buffer(name, torch.empty(0))
        if self._named:
            self.register_buffer("task_names", torch.empty(0, dtype=torch.uint8))
        self._expected_dtypes: dict[torch.dtype, dict[str, torch.dtype]] = {}

    @property
    def _has_state(self) -> bool:
        return self._buffers[self._state_names[0]].numel() > 0  # type: ignore[union-attr]

    @property
    def _named(self) -> bool:
        """Whether the caller can name the tasks (the class mixes in NamedTasks)."""
        return isinstance(self, NamedTasks)

    def _call_tasks(self, m: int) -> TaskNames | None:
        """The task names of a call on ``m`` rows (none here; see :class:`~._tasks.NamedTasks`)."""

        return None

    @property
    def known_tasks(self) -> tuple[Hashable, ...] | None:
        """The names of the tasks the state knows, in the order of its per-task rows."""
        return None if self._known_tasks is None else tuple(self._known_tasks)

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        """The state before any step for input ``sizes``, on the dtype and device of ``like``."""

        raise NotImplementedError

    def _state_sizes(self, count: int) -> tuple[int, ...]:
        """The input sizes the current state was built for (by default, the leading dimensions
        of the first buffer)."""

        state = self._buffers[self._state_names[0]]
        assert state is not None
        return tuple(state.shape[:count])

    def _ensure_state(
        self, sizes: tuple[int, ...], like: Tensor, *, warn: bool = True
    ) -> Tensor | None:
        """
        Makes the state fit a call on input ``sizes`` (the number of tasks, maybe the number of
        parameters) in the dtype and on the device of ``like``, and returns the per-task rows of
        the call's tasks (``None``: all known tasks, in order).

        The state is created on the first call. It is rebuilt, with a warning unless ``warn`` is
        false, when the sizes other than the number of tasks change, when the dtypes it would be
        built in for ``like`` differ from its own (a change of the input's precision, or a
        conversion of the module to half precision), without task names when the number of
        tasks changes, and when it was made on the meta device and ``like`` is not. State on
        another device than ``like`` is an error.
        """

        names = self._call_tasks(sizes[0])
        if self._has_state:
            if self._state_without_values and like.device.type != "meta":
                problem: str | None = (
                    f"received input on {like.device} but holds a state made on the meta device, "
                    "which has no values"
                )
            else:
                problem = self._mismatch(sizes, like, names)
            if problem is None:
                return self._rows_of(names, sizes, like)
            if warn:
                warn_user(f"`{self.__class__.__name__}` {problem}: its state was reset.")
        self._build(sizes, like, names)
        return None

    def _mismatch(
        self, sizes: tuple[int, ...], like: Tensor, names: tuple[Hashable, ...] | None
    ) -> str | None:
        """Why the state cannot serve this call (``None`` when it can)."""

        state = self._buffers[self._state_names[0]]
        assert state is not None
        if state.device != like.device:
            raise ValueError(
                f"The state of `{self.__class__.__name__}` is on {state.device} but the input is "
                f"on {like.device}. Move the aggregator with `.to({str(like.device)!r})`, or "
                "call `.reset()` to start afresh on the input's device."
            )
        previous = self._state_sizes(len(sizes))
        task_count_matters = names is None or self._known_tasks is None
        if previous[1:] != sizes[1:] or (task_count_matters and previous[0] != sizes[0]):
            return f"received {_describe(sizes)} after {_describe(previous)}"
        if self._keeps_state_dtype or torch.compiler.is_compiling():
            return None  # (compilation guards on the dtypes itself)
        expected = self._dtypes_for(sizes, like)
        for name in self._state_names:
            buffer = self._buffers[name]
            assert buffer is not None
            if buffer.dtype != expected[name]:
                return (
                    f"received a {like.dtype} input but holds {name} in {buffer.dtype} instead of "
                    f"{expected[name]}"
                )
        return None

    def _dtypes_for(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, torch.dtype]:
        """The dtype of each buffer of a state built for ``like`` (cached per input dtype)."""

        dtypes = self._expected_dtypes.get(like.dtype)
        if dtypes is None:
            meta = torch.empty(0, dtype=like.dtype, device="meta")
            dtypes = {k: v.dtype for k, v in self._initial_state(sizes, meta).items()}
            self._expected_dtypes[like.dtype] = dtypes
        return dtypes

    def _build(
        self, sizes: tuple[int, ...], like: Tensor, names: tuple[Hashable, ...] | None
    ) -> None:
        # Normal tensors even under torch.inference_mode(): later calls update them in place.
        with torch.inference_mode(False):
            for name, value in self._initial_state(sizes, like).items():
                setattr(self, name, value)
            if self._named:  # (encoded when saved) on the state's device
                self.task_names = torch.empty(0, dtype=torch.uint8, device=like.device)
        self._state_without_values = like.device.type == "meta"
        self._known_tasks = None if names is None else list(names)

    def _apply(self, fn: Any, recurse: bool = True) -> LazyState:
        # Every move and conversion (.to, .to_empty, .half, ...) passes here: a state moved to
        # the meta device loses its values, and to_empty back to a real device does not restore
        # them.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self._has_state and self._state_device.type == "meta":
            self._state_without_values = True
        return self

    @property
    def _state_device(self) -> torch.device:
        state = self._buffers[self._state_names[0]]
        assert state is not None
        return state.device

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        if self._named:  # beside the state, on its device
            names, state = self._known_tasks, self._buffers[self._state_names[0]]
            encoded = b"" if names is None else json.dumps(names).encode()
            assert state is not None
            with torch.inference_mode(False):
                self.task_names = torch.tensor(
                    list(encoded), dtype=torch.uint8, device=state.device
                )
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _rows_of(
        self, names: tuple[Hashable, ...] | None, sizes: tuple[int, ...], like: Tensor
    ) -> Tensor | None:
        """The per-task rows of the call's tasks; new names get rows of initial state."""

        if names is None:
            return None  # the rows are the known tasks, in order
        known = self._known_tasks
        if known is None:  # state built without names: these name its rows, in order
            self._known_tasks = list(names)
            return None
        if len(names) == len(known) and all(a == b for a, b in zip(names, known, strict=True)):
            return None
        index = {name: row for row, name in enumerate(known)}
        new = [name for name in names if name not in index]
        if new:
            self._add_task_rows(len(new), sizes, like)
            index.update({name: len(known) + k for k, name in enumerate(new)})
            known = [*known, *new]
            self._known_tasks = known
        rows = [index[name] for name in names]
        if rows == list(range(len(known))):
            return None
        return torch.tensor(rows, device=like.device)

    def _initial_task_rows(
        self, count: int, sizes: tuple[int, ...], like: Tensor
    ) -> dict[str, Tensor]:
        """The initial per-task state of ``count`` new tasks joining a call on ``sizes``."""

        initial = self._initial_state(sizes, like)
        return {name: initial[name][:count] for name in self._per_task_names}

    def _add_task_rows(self, count: int, sizes: tuple[int, ...], like: Tensor) -> None:
        """Appends ``count`` rows of the initial per-task state (that of a call on ``sizes``)."""

        initial = self._initial_task_rows(count, sizes, like)
        with torch.inference_mode(False):
            for name in self._per_task_names:
                buffer = self._buffers[name]
                assert buffer is not None
                self._buffers[name] = torch.cat([buffer, initial[name].to(buffer.dtype)])

    def _task_rows(self, name: str, rows: Tensor | None) -> Tensor:
        """The rows of per-task buffer ``name`` for the call's tasks."""

        buffer = self._buffers[name]
        assert buffer is not None
        return buffer if rows is None else buffer.index_select(0, rows)

    def _over_call_tasks(self, distribution: Tensor) -> Tensor:
        """
        The call's rows of a simplex-valued per-task state: with task names, renormalised over
        the tasks of the call (absent ones keep their share stored); without, as stored.
        """

        return distribution if self._known_tasks is None else distribution / distribution.sum()

    def _commit(self, finite: Tensor, rows: Tensor | None = None, **new_state: Tensor) -> None:
        """
        Writes ``new_state`` into the buffers where ``finite`` is true and keeps them otherwise.
        A per-task value covers the call's tasks, ``rows`` of its buffer (all when ``None``).
        """

        for name, value in new_state.items():
            buffer = getattr(self, name)
            if rows is not None and name in self._per_task_names:
                current = buffer.index_select(0, rows)
                buffer.index_copy_(0, rows, torch.where(finite, value.to(buffer.dtype), current))
            else:
                # In place (one pass, and the buffer keeps its address for CUDA graphs). A 0-dim
                # buffer is written through a 1-element view: inductor (torch 2.13, CPU) drops an
                # in-place write into a 0-dim float64 buffer.
                new, target = value.to(buffer.dtype), buffer
                if buffer.ndim == 0:
                    new, target = new.reshape(1), buffer.view(1)
                torch.where(finite, new, target, out=target)

    def reset(self) -> None:
        """Forgets all state: the next call behaves as the first call of a new instance."""

        for name in self._state_names:
            buffer = self._buffers[name]
            assert buffer is not None
            self._buffers[name] = buffer.new_empty(0)
        self._state_without_values = False
        self._known_tasks = None

    def _load_current_state(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The buffers take the saved shapes and dtypes first, so that a checkpoint loads into a
        # fresh instance whose buffers are still empty; they stay on this module's device.
        for name in self._state_names:
            saved = state_dict.get(prefix + name)
            buffer = self._buffers[name]
            if isinstance(saved, Tensor) and buffer is not None:
                self._buffers[name] = torch.empty_like(saved, device=buffer.device)
        if self._named:  # checkpoints written before tasks had names: no names
            saved_names = state_dict.setdefault(
                prefix + "task_names", torch.empty(0, dtype=torch.uint8)
            )
            if isinstance(saved_names, Tensor):
                self.task_names = torch.empty_like(saved_names, device=self.task_names.device)
        super()._load_current_state(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Values loaded into a module on the meta device are dropped there.
        self._state_without_values = self._has_state and self._state_device.type == "meta"
        if self._named and self.task_names.device.type != "meta":  # a host read, at loading only
            encoded = bytes(self.task_names.tolist())
            self._known_tasks = decoded_task_names(json.loads(encoded)) if encoded else None
        # A part of the state (strict=False) would only fail later, far from its cause.
        keys = (*self._state_names, *self._more_state_keys)
        absent = [name for name in keys if prefix + name not in state_dict]
        if absent and len(absent) < len(keys):
            error_msgs.append(
                f"The state of `{self.__class__.__name__}` is all or nothing: the checkpoint lacks "
                f"{', '.join(prefix + name for name in absent)}. Load a whole state_dict, or none "
                "(and call reset())."
            )


def _describe(sizes: tuple[int, ...]) -> str:
    words = [f"{sizes[0]} tasks"] + [f"{size} parameters" for size in sizes[1:]]
    return " and ".join(words)


def decoded_task_names(names: list[Any]) -> list[Hashable]:
    """Task names read back from JSON, with their tuples (JSON lists) as tuples again."""

    def hashable(value: Any) -> Hashable:
        return tuple(hashable(part) for part in value) if isinstance(value, list) else value

    return [hashable(name) for name in names]
