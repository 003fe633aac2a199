"""
Multi-task gradient-balancing methods as torchjd aggregators and weightings.

Every method is a :class:`torchjd.aggregation.Weighting` wrapped by a
:class:`torchjd.aggregation.Aggregator`, so it drops into ``torchjd.autojac.jac_to_grad`` after
``backward``/``mtl_backward``, and its Gramian weightings work with the autogram ``Engine``.
"""

from .aggregation import (
    GABA,
    PHI,
    AdaptiveGoldenPendulum,
    AdaptiveGoldenPendulumWeighting,
    DynamicK,
    DynamicKWeighting,
    ExcessMTL,
    ExcessMTLWeighting,
    GABAWeighting,
    GCond,
    GCondStatistics,
    GCondWeighting,
    GoldenPendulum,
    GoldenPendulumWeighting,
    TaskGroup,
    golden_ratio_weights,
)
from .config import aggregator_from_config, available_names, weighting_from_config
from .monitoring import (
    ConflictMonitor,
    ConflictReport,
    GramianDiagnostics,
    WeightLogger,
    gramian_diagnostics,
)
from .schedule import Curriculum, Phase, Preset, get_preset, list_presets
from .step import (
    JacobianDescent,
    backward_task,
    sharded_jac_to_grad,
    sync_jacobians,
    with_grad_scaler,
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
    "JacobianDescent",
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
