"""
The public API of ``golden-pendulum-mtl`` 0.2.0 (module ``golden_pendulum``), built on
torchjd-golden and torchjd: replace ``golden_pendulum`` by ``torchjd_golden.golden_pendulum``
in the imports, and the same calls give the same weights and gradients.

Each task's gradient comes from one torchjd ``backward`` (the reference runs one backward pass
per task), the balancing is :class:`torchjd_golden.GoldenPendulum`, and the ``.grad`` fields are
written as the reference writes them. The pro tier is :mod:`torchjd_golden.golden_pendulum.pro`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .callbacks import GoldenPendulumCallback, WeightLogger
from .core import PHI, GoldenPendulumMTL, golden_nash_backward, golden_ratio_weights

__version__ = "0.2.0"
"""The version of ``golden-pendulum-mtl`` whose API this module mirrors."""

__all__ = [
    "PHI",
    "GoldenPendulumCallback",
    "GoldenPendulumMTL",
    "WeightLogger",
    "golden_nash_backward",
    "golden_ratio_weights",
]


def __getattr__(name: str) -> ModuleType:
    # As the reference: ``golden_pendulum.pro`` works after ``import golden_pendulum``.
    if name == "pro":
        return importlib.import_module(f"{__name__}.pro")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
