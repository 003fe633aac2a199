"""
Watching the methods train: conflict diagnostics of a Gramian (:func:`gramian_diagnostics`), a
logger of the weights of any weighting (:class:`WeightLogger`), and a diagnostics engine over a
rolling window of steps fed by the Gramian the aggregator already computed
(:class:`ConflictMonitor`).

It stands on :mod:`torchjd_golden.aggregation` alone.
"""

from ._diagnostics import ConflictMonitor, ConflictReport
from ._monitoring import GramianDiagnostics, WeightLogger, gramian_diagnostics

__all__ = [
    "ConflictMonitor",
    "ConflictReport",
    "GramianDiagnostics",
    "WeightLogger",
    "gramian_diagnostics",
]
