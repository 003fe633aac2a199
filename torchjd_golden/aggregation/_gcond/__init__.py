"""
GCond, the Gradient Conductor: its weighting and aggregator, their hyper-parameters, the store of
the last two Jacobians and the statistics of a call. The arbitration loop itself is a kernel
(:mod:`.._kernels.gcond`), with the other sequential solvers.
"""

from ._aggregator import GCond
from ._statistics import GCondStatistics
from ._weighting import GCondWeighting

__all__ = ["GCond", "GCondStatistics", "GCondWeighting"]
