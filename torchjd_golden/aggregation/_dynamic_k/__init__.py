"""
DynamicK: Golden Pendulum within groups of named tasks, golden-ratio weights across them.
"""

from ._weighting import DynamicK, DynamicKWeighting, TaskGroup

__all__ = ["DynamicK", "DynamicKWeighting", "TaskGroup"]
