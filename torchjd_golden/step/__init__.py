"""
The training step: :class:`JacobianDescent` turns per-task losses into ``.grad`` on every
trainable parameter, on one process, under DDP and under FSDP2, from the Jacobian of the shared
parameters (exact) or from the Gramian of the shared features (fast).
"""

from ._engine import GramianSource, JacobianDescent

__all__ = ["GramianSource", "JacobianDescent"]
