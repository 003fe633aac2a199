"""
Training schedules: curricula of phases, each with its own tasks, backbone freezing,
:math:`\\lambda`, PCGrad switch and learning rate (:class:`Curriculum`, :class:`Phase`), and the
presets of ``golden_pendulum.pro`` (:func:`get_preset`).

It stands on :mod:`torchjd_golden.aggregation` alone.
"""

from ._curriculum import Curriculum
from ._phase import Phase
from ._presets import Preset, get_preset, list_presets

__all__ = ["Curriculum", "Phase", "Preset", "get_preset", "list_presets"]
