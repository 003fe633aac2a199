"""The earlier name of :mod:`torchjd_golden.integrations.lightning`, which it re-exports."""

from .integrations.lightning import MultiTaskModule, TaskLosses

__all__ = ["MultiTaskModule", "TaskLosses"]
