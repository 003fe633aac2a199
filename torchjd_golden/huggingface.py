"""The earlier name of :mod:`torchjd_golden.integrations.huggingface`, which it re-exports."""

from .integrations.huggingface import AGGREGATOR_STATE_NAME, MultiTaskTrainer, TaskLosses

__all__ = ["AGGREGATOR_STATE_NAME", "MultiTaskTrainer", "TaskLosses"]
