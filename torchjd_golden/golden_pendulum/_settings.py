"""The settings of the drop-in classes: those of the native aggregator each one drives."""

from __future__ import annotations

from typing import Any


def aggregator_setting(native: type, name: str) -> property:
    """
    A property that reads and writes ``name`` on the instance's ``aggregator`` (an instance of
    ``native``), with the native attribute's docstring: one place validates the value.
    """

    def get(self: Any) -> Any:
        return getattr(self.aggregator, name)

    def set_(self: Any, value: Any) -> None:
        setattr(self.aggregator, name, value)

    return property(get, set_, doc=getattr(native, name).__doc__)
