"""
CI: run by the Python of a fresh virtual environment that holds only the wheel and its runtime
dependencies. The package imports without any extra, and every method aggregates a small
Jacobian into a finite vector.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import torchjd_golden
from torchjd_golden import GABA, AdaptiveGoldenPendulum, ExcessMTL, GCond, GoldenPendulum

assert "site-packages" in Path(torchjd_golden.__file__).parts, torchjd_golden.__file__
optional = {"matplotlib", "sklearn", "yaml", "omegaconf"} & set(sys.modules)
assert not optional, f"import torchjd_golden imported optional dependencies: {sorted(optional)}"

jacobian = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
losses = torch.tensor([200.0, 0.7, 1.0])
for aggregator in (GoldenPendulum(), AdaptiveGoldenPendulum(), GABA(), ExcessMTL(), GCond()):
    for _ in range(3):  # the stateful ones update their state
        if isinstance(aggregator, AdaptiveGoldenPendulum):
            aggregator.losses = losses  # an input of each step, like the Jacobian
        update = aggregator(jacobian)
    assert update.shape == (20,), (aggregator, update.shape)
    assert torch.isfinite(update).all(), aggregator
    assert update.norm() > 0, aggregator
    print(f"CI: wheel {torchjd_golden.__version__}: {aggregator}: |update| = {update.norm():.4f}")
