"""
Checkpoints in every form this package ever wrote load: one override of ``_load_from_state_dict``
brings a saved ``state_dict`` to the keys that the module's buffers load, before anything loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

Migration = Callable[[dict[str, Any], str], None]
"""
Rewrites, in place, the keys under a prefix of a ``state_dict`` in an earlier (or a checkpoint's
own) form into those the module loads. It leaves a ``state_dict`` already in that form alone.
"""


class CheckpointMigrations(nn.Module):
    """
    Mixin of a module whose checkpoints may hold its state in another form than its buffers:
    written by an earlier version, or saved in a smaller form (GCond's store). Each class lists
    its :data:`Migration` functions in :attr:`_state_migrations`, oldest first; this one
    override runs them on the module's keys and then loads as a module does
    (:meth:`_load_current_state`, which a module that loads more than its buffers extends).

    The rewrite is in place, on the ``state_dict`` that ``load_state_dict`` hands each module
    (its own copy of the caller's), so that a rewrite of a submodule's keys reaches the
    submodule.
    """

    _state_migrations: ClassVar[tuple[Migration, ...]] = ()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for migrate in self._state_migrations:
            migrate(state_dict, prefix)
        self._load_current_state(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
        """Loads a ``state_dict`` in the current form (as :class:`torch.nn.Module` does)."""

        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
