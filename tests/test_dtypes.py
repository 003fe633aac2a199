"""
Every floating dtype and the devices at hand: outputs in the input's dtype, close to the float64
result on the same (rounded) input, and state that follows ``.to()``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from torchjd_golden import (
    ExcessMTLWeighting,
    GABAWeighting,
    GCondWeighting,
    GoldenPendulumWeighting,
)

from ._inputs import conflicting_jacobian
from ._methods import AGGREGATORS as AGGREGATOR_METHODS

# Each aggregator without extra inputs (the adaptive variant's losses are set in its own tests).
AGGREGATORS: dict[str, Callable[[], nn.Module]] = {
    method.name: method.make for method in AGGREGATOR_METHODS if not method.needs_extra_inputs
}
SYNC_FREE = [
    method.name
    for method in AGGREGATOR_METHODS
    if method.sync_free_calls and method.name in AGGREGATORS
]
STATEFUL = [
    method.name for method in AGGREGATOR_METHODS if method.stateful and method.name in AGGREGATORS
]

# Relative error of a 5-step run against float64 on the same rounded input: a few units of the
# dtype's rounding (float16 has an 11-bit significand, bfloat16 an 8-bit one).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The GPU cases join where a CUDA device is present (a session with the lent GPU machine).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _steps(dtype: torch.dtype, device: str, count: int = 5) -> list[Tensor]:
    """Jacobians whose row norms span two decades (float16 holds their squares)."""

    return [
        conflicting_jacobian(4, 300, seed=s, decades=2.0).to(device=device, dtype=dtype)
        for s in range(count)
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("name", AGGREGATORS)
def test_output_has_the_input_dtype_and_the_float64_value(
    name: str, dtype: torch.dtype, device: str
) -> None:
    low, high = AGGREGATORS[name]().to(device), AGGREGATORS[name]().to(device)
    for jacobian in _steps(dtype, device):
        output, expected = low(jacobian), high(jacobian.double())
        assert output.dtype == dtype
        assert output.device == jacobian.device
        error = (output.double() - expected).abs().max() / expected.abs().max()
        assert error <= TOLERANCES[dtype], (name, dtype, float(error))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "make",
    [GoldenPendulumWeighting, lambda: GABAWeighting(warmup_steps=0)],
    ids=["GoldenPendulumWeighting", "GABAWeighting"],
)
def test_gramian_weightings_return_weights_in_the_gramian_dtype(
    make: Callable[[], nn.Module], dtype: torch.dtype
) -> None:
    jacobian = _steps(torch.float64, "cpu", count=1)[0]
    gramian = jacobian @ jacobian.T
    rounded = gramian.to(dtype)
    weights = make()(rounded)
    assert weights.dtype == dtype
    expected = make()(rounded.double())
    torch.testing.assert_close(weights.double(), expected, rtol=TOLERANCES[dtype], atol=0)


@pytest.mark.parametrize(
    "make", [ExcessMTLWeighting, GCondWeighting], ids=["ExcessMTLWeighting", "GCondWeighting"]
)
def test_half_precision_statistics_are_kept_in_float32_or_wider(
    make: Callable[[], nn.Module],
) -> None:
    """
    Squares and norms of a float16 Jacobian would overflow float16 state; only GCond's copy of
    the previous Jacobian, which is exact, keeps the input's dtype.
    """

    weighting = make()
    jacobian = _steps(torch.float16, "cpu", count=1)[0]
    weighting(jacobian)
    state = {k: v for k, v in weighting.state_dict().items() if v.is_floating_point()}
    previous = state.pop("previous_jacobian", jacobian)
    assert torch.equal(previous, jacobian)
    assert state
    assert all(v.dtype in (torch.float32, torch.float64) for v in state.values()), state


@pytest.mark.parametrize("name", STATEFUL)
def test_state_follows_to_a_dtype(name: str) -> None:
    """
    ``.to(float64)`` converts the state, which then continues as a float64 module loaded with
    the converted state would.
    """

    steps = _steps(torch.float32, "cpu")
    moved, loaded = AGGREGATORS[name](), AGGREGATORS[name]()
    for jacobian in steps[:3]:
        moved(jacobian)
    converted = {
        k: v.double() if v.is_floating_point() else v for k, v in moved.state_dict().items()
    }
    moved.to(torch.float64)
    assert all(
        v.dtype == torch.float64 for v in moved.state_dict().values() if v.is_floating_point()
    )
    loaded.load_state_dict(converted)
    for jacobian in steps[3:]:
        torch.testing.assert_close(
            moved(jacobian.double()), loaded(jacobian.double()), rtol=0, atol=0
        )


# Defined only where a GPU is present, rather than skipped everywhere else.
if torch.cuda.is_available():

    @pytest.mark.parametrize("name", SYNC_FREE)
    def test_no_forward_synchronises_with_the_host(name: str) -> None:
        """``set_sync_debug_mode("error")`` makes any device-to-host synchronisation an error."""

        aggregator = AGGREGATORS[name]().to("cuda")
        steps = _steps(torch.float32, "cuda")
        aggregator(steps[0])  # the first call allocates the state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outputs = [aggregator(jacobian) for jacobian in steps[1:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(output.isfinite().all() for output in outputs)
