"""
Multi-task gradient-balancing methods as torchjd aggregators and weightings.

Every method is a :class:`torchjd.aggregation.Weighting` wrapped by a
:class:`torchjd.aggregation.Aggregator`, so it drops into ``torchjd.autojac.jac_to_grad`` after
``backward``/``mtl_backward``, and its Gramian weightings work with the autogram ``Engine``.
"""

from ._accumulation import backward_task
from ._amp import with_grad_scaler
from ._config import aggregator_from_config, available_names, weighting_from_config
from ._curriculum import Curriculum, Phase
from ._diagnostics import ConflictMonitor, ConflictReport
from ._distributed import sharded_jac_to_grad, sync_jacobians
from ._monitoring import GramianDiagnostics, WeightLogger, gramian_diagnostics
from ._presets import Preset, get_preset, list_presets
from .aggregation._adaptive_golden_pendulum import (
    AdaptiveGoldenPendulum,
    AdaptiveGoldenPendulumWeighting,
)
from .aggregation._dynamic_k import DynamicK, DynamicKWeighting, TaskGroup
from .aggregation._excess_mtl import ExcessMTL, ExcessMTLWeighting
from .aggregation._gaba import GABA, GABAWeighting
from .aggregation._gcond import GCond, GCondWeighting
from .aggregation._gcond_statistics import GCondStatistics
from .aggregation._golden_pendulum import (
    PHI,
    GoldenPendulum,
    GoldenPendulumWeighting,
    golden_ratio_weights,
)

__version__ = "0.1.0"

__all__ = [
    "GABA",
    "PHI",
    "AdaptiveGoldenPendulum",
    "AdaptiveGoldenPendulumWeighting",
    "ConflictMonitor",
    "ConflictReport",
    "Curriculum",
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
    "GramianDiagnostics",
    "Phase",
    "Preset",
    "TaskGroup",
    "WeightLogger",
    "aggregator_from_config",
    "available_names",
    "backward_task",
    "get_preset",
    "golden_ratio_weights",
    "gramian_diagnostics",
    "list_presets",
    "sharded_jac_to_grad",
    "sync_jacobians",
    "weighting_from_config",
    "with_grad_scaler",
]
