"""
The pro tier of ``golden-pendulum-mtl`` 0.2.0 (module ``golden_pendulum.pro``), built on
torchjd-golden's :class:`~torchjd_golden.AdaptiveGoldenPendulum`,
:class:`~torchjd_golden.DynamicK`, :class:`~torchjd_golden.Curriculum`,
:class:`~torchjd_golden.ConflictMonitor` and presets, with the reference's numbers.
"""

from ...monitoring import ConflictReport
from ...schedule import Phase
from .adaptive import AdaptiveLambda
from .curriculum import CurriculumScheduler
from .diagnostics import DiagnosticsEngine
from .dynamic_k import DynamicK, TaskGroup
from .presets import FinancePreset, get_preset, list_presets

__all__ = [
    "AdaptiveLambda",
    "ConflictReport",
    "CurriculumScheduler",
    "DiagnosticsEngine",
    "DynamicK",
    "FinancePreset",
    "Phase",
    "TaskGroup",
    "get_preset",
    "list_presets",
]
