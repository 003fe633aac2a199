"""``golden_pendulum.pro.presets``: the same five presets, by name."""

from __future__ import annotations

from ...schedule import _presets as native

FinancePreset = native.Preset
"""A preset's phases and recommendations (:class:`torchjd_golden.Preset`)."""

list_presets = native.list_presets


def get_preset(name: str) -> native.Preset:
    """
    The preset ``name`` (see :func:`torchjd_golden.get_preset`).

    :raises KeyError: For an unknown name, as the reference (the native function raises a
        ``ValueError``).
    """

    try:
        return native.get_preset(name)
    except ValueError:
        available = ", ".join(sorted(list_presets()))
        raise KeyError(f"Unknown preset '{name}'. Available: {available}") from None
