"""
The training step around an aggregator: each task's gradient accumulated into its own row of the
Jacobian (:func:`backward_task`), aggregation under a ``GradScaler`` (:func:`with_grad_scaler`),
the same aggregation on every rank of ``torch.distributed`` (:func:`sync_jacobians`,
:func:`sharded_jac_to_grad`), and the step that the trainer integrations share.

It stands on :mod:`torchjd_golden.aggregation`, :mod:`torchjd_golden.monitoring` and
:mod:`torchjd_golden.config`, and imports no trainer.
"""

from ._accumulation import backward_task
from ._amp import with_grad_scaler
from ._distributed import sharded_jac_to_grad, sync_jacobians

__all__ = ["backward_task", "sharded_jac_to_grad", "sync_jacobians", "with_grad_scaler"]
