"""
Checkpoints written by an earlier release load into a fresh instance of today's code
(``weights_only=True``) and continue with the outputs that release gave. ``data/checkpoints.pt``
was written by ``data/make_checkpoints.py`` before the package was reorganised. The outputs agree
to 16 m units of float64 rounding: the vectorised PCGrad pass rounds its last bits differently
from the scalar loop that wrote them, and another CPU's kernels round the Gramian differently
from the one that wrote them (measured: at most 4 units).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import torchjd_golden

from .._asserts import relative_error
from .._knife_edge import tight_tolerance

CHECKPOINTS: dict[str, dict[str, Any]] = torch.load(
    Path(__file__).parents[1] / "data" / "checkpoints.pt", weights_only=True
)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_an_old_checkpoint_continues_with_the_same_outputs(name: str) -> None:
    case = CHECKPOINTS[name]
    aggregator = getattr(torchjd_golden, case["class"])(**case["keywords"])
    aggregator.load_state_dict(case["state_dict"])
    for jacobian, expected in zip(case["inputs"], case["outputs"], strict=True):
        if isinstance(aggregator, torchjd_golden.AdaptiveGoldenPendulum):
            aggregator.losses = (jacobian**2).sum(dim=1) + 1e-3
        tolerance = tight_tolerance(jacobian.shape[0], jacobian.dtype)
        assert relative_error(aggregator(jacobian), expected) <= tolerance
