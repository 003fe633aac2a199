"""
Bad input gets a clear error that names the problem, never a wrong result. (An input on another
device than the state, and a change in the number of tasks, are covered with the other state
rules in test_state.py; unknown config keys in test_config.py.)
"""

from __future__ import annotations

import pytest
import torch

from .._methods import METHODS, Method

BAD_INPUTS: list[tuple[object, str]] = [
    (torch.ones(3), "dimension|2 dimensions"),
    (torch.ones(2, 2, 2), "dimension|2 dimensions"),
    (torch.ones(2, 2, dtype=torch.int64), "floating-point"),
    (torch.ones(2, 2, dtype=torch.bool), "floating-point"),
    (torch.zeros(0, 0), "at least one task"),
    ([[1.0, 0.0], [0.0, 1.0]], "tensor"),
]


@pytest.mark.parametrize("method", METHODS, ids=str)
@pytest.mark.parametrize(
    ("bad", "message"), BAD_INPUTS, ids=lambda v: str(v)[:20] if isinstance(v, str) else None
)
def test_malformed_input_is_named(method: Method, bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        method.make()(bad)


@pytest.mark.parametrize("method", [m for m in METHODS if m.takes == "jacobian"], ids=str)
@pytest.mark.parametrize(
    ("shape", "message"), [((0, 4), "at least one task"), ((3, 0), "at least one parameter")]
)
def test_empty_jacobians_are_named(method: Method, shape: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        method.make()(torch.zeros(shape))


@pytest.mark.parametrize("method", [m for m in METHODS if m.takes == "gramian"], ids=str)
def test_a_non_square_gramian_is_named(method: Method) -> None:
    with pytest.raises(ValueError, match=r"square Gramian \(m x m\). Found shape \(2, 3\)"):
        method.make()(torch.ones(2, 3))
