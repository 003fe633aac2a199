"""
State kept by the stateful weightings: buffers sized by the first input, saved and restored by
``state_dict``, and never changed by a step whose input is not finite.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchjd import Stateful


class LazyState(nn.Module, Stateful):
    """
    Mixin for a module whose state tensors are created on the first call, once the number of
    tasks is known.

    Each name in :attr:`_state_names` is a registered buffer, so ``.to()``, ``state_dict()`` and
    ``torch.load(weights_only=True)`` carry all of it. Before the first call the buffers are
    empty; a checkpoint loads into a fresh instance by taking the saved shapes. Subclasses build
    the initial state in :meth:`_initial_state`; the leading dimensions of the first buffer are
    the input's sizes the state depends on (the number of tasks, and for some methods the number
    of parameters).
    """

    _state_names: ClassVar[tuple[str, ...]]

    def _register_state(self) -> None:
        for name in self._state_names:
            self.register_buffer(name, torch.empty(0))

    @property
    def _has_state(self) -> bool:
        return self._buffers[self._state_names[0]].numel() > 0  # type: ignore[union-attr]

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        """The state before any step for input ``sizes``, on the dtype and device of ``like``."""

        raise NotImplementedError

    def _state_sizes(self, count: int) -> tuple[int, ...]:
        """The input sizes the current state was built for (by default, the leading dimensions
        of the first buffer)."""

        state = self._buffers[self._state_names[0]]
        assert state is not None
        return tuple(state.shape[:count])

    def _ensure_state(self, sizes: tuple[int, ...], like: Tensor, *, warn: bool = True) -> None:
        """
        Creates the state on the first call, and resets it (with a warning unless ``warn`` is
        false) when the input sizes it depends on (``sizes``: the number of tasks, maybe the
        number of parameters) change.
        """

        if self._has_state:
            state = self._buffers[self._state_names[0]]
            assert state is not None
            if state.device != like.device:
                raise ValueError(
                    f"The state of `{self.__class__.__name__}` is on {state.device} but the input "
                    f"is on {like.device}. Move the aggregator with `.to({str(like.device)!r})`."
                )
            previous = self._state_sizes(len(sizes))
            if previous == sizes:
                return
            if warn:
                warnings.warn(
                    f"`{self.__class__.__name__}` received {_describe(sizes)} after "
                    f"{_describe(previous)}: its state was reset.",
                    stacklevel=4,
                )
        for name, value in self._initial_state(sizes, like).items():
            setattr(self, name, value)

    def _commit(self, finite: Tensor, **new_state: Tensor) -> None:
        """Writes ``new_state`` into the buffers where ``finite`` is true, keeps them otherwise."""

        for name, value in new_state.items():
            buffer = getattr(self, name)
            # In place (one pass, and the buffer keeps its address for CUDA graphs).
            torch.where(finite, value.to(buffer.dtype), buffer, out=buffer)

    def reset(self) -> None:
        """Forgets all state: the next call behaves as the first call of a new instance."""

        for name in self._state_names:
            buffer = self._buffers[name]
            assert buffer is not None
            self._buffers[name] = buffer.new_empty(0)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
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
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _describe(sizes: tuple[int, ...]) -> str:
    words = [f"{sizes[0]} tasks"] + [f"{size} parameters" for size in sizes[1:]]
    return " and ".join(words)
