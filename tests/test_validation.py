"""
Bad input gets a clear error that names the problem, never a wrong result. (An input on another
device than the state, and a change in the number of tasks, are covered with the other state
rules in test_state.py; unknown config keys in test_config.py.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from torchjd_golden import (
    GABA,
    AdaptiveGoldenPendulum,
    AdaptiveGoldenPendulumWeighting,
    ExcessMTL,
    ExcessMTLWeighting,
    GABAWeighting,
    GCond,
    GCondWeighting,
    GoldenPendulum,
    GoldenPendulumWeighting,
)

AGGREGATORS: dict[str, Callable[[], nn.Module]] = {
    "GoldenPendulum": GoldenPendulum,
    "AdaptiveGoldenPendulum": lambda: AdaptiveGoldenPendulum(loss_ratio_aware=False),
    "GABA": GABA,
    "ExcessMTL": ExcessMTL,
    "GCond": GCond,
}
JACOBIAN_WEIGHTINGS: dict[str, Callable[[], nn.Module]] = {
    "ExcessMTLWeighting": ExcessMTLWeighting,
    "GCondWeighting": GCondWeighting,
}
GRAMIAN_WEIGHTINGS: dict[str, Callable[[], nn.Module]] = {
    "GoldenPendulumWeighting": GoldenPendulumWeighting,
    "AdaptiveGoldenPendulumWeighting": lambda: AdaptiveGoldenPendulumWeighting(
        loss_ratio_aware=False
    ),
    "GABAWeighting": GABAWeighting,
}
ALL = {**AGGREGATORS, **JACOBIAN_WEIGHTINGS, **GRAMIAN_WEIGHTINGS}

BAD_INPUTS: list[tuple[object, str]] = [
    (torch.ones(3), "dimension|2 dimensions"),
    (torch.ones(2, 2, 2), "dimension|2 dimensions"),
    (torch.ones(2, 2, dtype=torch.int64), "floating-point"),
    (torch.ones(2, 2, dtype=torch.bool), "floating-point"),
    (torch.zeros(0, 0), "at least one task"),
    ([[1.0, 0.0], [0.0, 1.0]], "tensor"),
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("bad", "message"), BAD_INPUTS, ids=lambda v: str(v)[:20] if isinstance(v, str) else None
)
def test_malformed_input_is_named(name: str, bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ALL[name]()(bad)


@pytest.mark.parametrize("name", {**AGGREGATORS, **JACOBIAN_WEIGHTINGS})
@pytest.mark.parametrize(
    ("shape", "message"), [((0, 4), "at least one task"), ((3, 0), "at least one parameter")]
)
def test_empty_jacobians_are_named(name: str, shape: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ALL[name]()(torch.zeros(shape))


@pytest.mark.parametrize("name", GRAMIAN_WEIGHTINGS)
def test_a_non_square_gramian_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=r"square Gramian \(m x m\). Found shape \(2, 3\)"):
        ALL[name]()(torch.ones(2, 3))
