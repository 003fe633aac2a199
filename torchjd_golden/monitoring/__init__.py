"""
Watching the methods train: conflict diagnostics of a Gramian (:func:`gramian_diagnostics`), a
logger of the weights of any weighting (:class:`WeightLogger`), and a diagnostics engine over a
rolling window of steps fed by the Gramian the aggregator already computed
(:class:`ConflictMonitor`).

It stands on :mod:`torchjd_golden.aggregation` alone.
"""

from ._conflict_monitor import ConflictMonitor
from ._conflict_report import ConflictReport
from ._gramian_diagnostics import GramianDiagnostics, gramian_diagnostics
from ._weight_logger import WeightLogger

__all__ = [
    "ConflictMonitor",
    "ConflictReport",
    "GramianDiagnostics",
    "WeightLogger",
    "gramian_diagnostics",
]
