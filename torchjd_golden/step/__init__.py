"""
The training step: :class:`JacobianDescent` turns per-task losses into ``.grad`` on every
trainable parameter, on one process, under DDP and under FSDP2, from the Jacobian of the shared
parameters (exact) or from the Gramian of the shared features (fast). Around it, the pieces it and
the trainer integrations share: each task's gradient accumulated into its own row of the Jacobian
(:func:`backward_task`), aggregation under a ``GradScaler`` (:func:`with_grad_scaler`), and the
same aggregation on every rank of ``torch.distributed`` (:func:`sync_jacobians`,
:func:`sharded_jac_to_grad`).

It stands on :mod:`torchjd_golden.aggregation`, :mod:`torchjd_golden.monitoring` and
:mod:`torchjd_golden.config`, and imports no trainer.
"""

from ._accumulation import backward_task
from ._amp import with_grad_scaler
from ._distributed import sharded_jac_to_grad, sync_jacobians
from ._engine import JacobianDescent
from ._sharded import GramianSource

__all__ = [
    "GramianSource",
    "JacobianDescent",
    "backward_task",
    "sharded_jac_to_grad",
    "sync_jacobians",
    "with_grad_scaler",
]
