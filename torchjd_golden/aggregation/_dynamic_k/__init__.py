"""
DynamicK: Golden Pendulum within groups of named tasks, golden-ratio weights across them.
"""

from ._aggregator import DynamicK
from ._groups import TaskGroup
from ._weighting import DynamicKWeighting

__all__ = ["DynamicK", "DynamicKWeighting", "TaskGroup"]
