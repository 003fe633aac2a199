"""
The methods, each a :class:`torchjd.aggregation.Weighting` paired with an
:class:`torchjd.aggregation.Aggregator` (one private module, or one folder, per method), and what
they stand on: the Gram core, the state kept in buffers, tasks by name, the validation of inputs
and hyper-parameters, the private-torchjd shim and the sequential solvers (``_kernels``).

This is the lowest layer of the package: it imports nothing else of it.
"""

from ._adaptive_golden_pendulum import AdaptiveGoldenPendulum, AdaptiveGoldenPendulumWeighting
from ._dynamic_k import DynamicK, DynamicKWeighting, TaskGroup
from ._excess_mtl import ExcessMTL, ExcessMTLWeighting
from ._gaba import GABA, GABAWeighting
from ._gcond import GCond, GCondStatistics, GCondWeighting
from ._golden_pendulum import PHI, GoldenPendulum, GoldenPendulumWeighting, golden_ratio_weights

__all__ = [
    "GABA",
    "PHI",
    "AdaptiveGoldenPendulum",
    "AdaptiveGoldenPendulumWeighting",
    "DynamicK",
    "DynamicKWeighting",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "GABAWeighting",
    "GCond",
    "GCondStatistics",
    "GCondWeighting",
    "GoldenPendulum",
    "GoldenPendulumWeighting",
    "TaskGroup",
    "golden_ratio_weights",
]
