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
    DynamicK,
    DynamicKWeighting,
    ExcessMTLWeighting,
    GABAWeighting,
    GCondWeighting,
    GoldenPendulumWeighting,
    TaskGroup,
)

from .._asserts import relative_error
from .._devices import DEVICES, host_synchronisation_is_an_error, requires_cuda
from .._inputs import conflicting_jacobian
from .._methods import METHODS, Method

# DynamicK's modes, named here (where the registry has an entry of the same name, it is used):
# given groups of the row indices, groups found by the first call, and the weighting.
_GROUPS = [TaskGroup("first", [0, 1]), TaskGroup("second", [2, 3])]
_DYNAMIC_K = [
    Method("DynamicK(groups)", DynamicK, {"groups": _GROUPS}),
    Method("DynamicK(auto_group=True)", DynamicK, {"auto_group": True}),
    Method("DynamicKWeighting(groups)", DynamicKWeighting, {"groups": _GROUPS}, takes="gramian"),
]
# Every method of the registry with its extra inputs (the adaptive variant's losses), and DynamicK.
CASES: dict[str, Method] = {method.name: method for method in [*_DYNAMIC_K, *METHODS]}
AGGREGATORS = [name for name, method in CASES.items() if method.is_aggregator]
STATEFUL = [name for name in AGGREGATORS if CASES[name].stateful]
# The cases whose calls after the first never read a value on the host (not the automatic
# regrouping every few calls of the registry's DynamicK variant, which reads its cosines).
SYNC_FREE = [name for name, method in CASES.items() if method.sync_free_calls]

# Relative error of a 5-step run against float64 on the same rounded input: a few units of the
# dtype's rounding (float16 has an 11-bit significand, bfloat16 an 8-bit one).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


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
    method = CASES[name]
    low, high = method.make().to(device), method.make().to(device)
    for jacobian in _steps(dtype, device):
        output, expected = method.step(low, jacobian), method.step(high, jacobian.double())
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

    method = CASES[name]
    steps = _steps(torch.float32, "cpu")
    moved, loaded = method.make(), method.make()
    for jacobian in steps[:3]:
        method.step(moved, jacobian)
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
            method.step(moved, jacobian.double()),
            method.step(loaded, jacobian.double()),
            rtol=0,
            atol=0,
        )


def test_the_cuda_checks_cover_every_method_dynamic_k_and_the_adaptive_variant() -> None:
    assert {method.name for method in METHODS} <= CASES.keys()
    assert {"AdaptiveGoldenPendulum", "AdaptiveGoldenPendulumWeighting"} <= CASES.keys()
    made = [type(method.make()) for method in CASES.values()]
    assert DynamicK in made
    assert DynamicKWeighting in made


@requires_cuda
@pytest.mark.parametrize("name", SYNC_FREE)
def test_no_forward_synchronises_with_the_host(name: str) -> None:
    """
    ``set_sync_debug_mode("error")`` makes any device-to-host synchronisation an error; the
    outputs are the CPU's.
    """

    method = CASES[name]
    module, on_cpu = method.make().to("cuda"), method.make()
    steps = [method.input_of(jacobian) for jacobian in _steps(torch.float32, "cuda")]
    # The first call allocates the state (and finds DynamicK's automatic groups).
    method.step(module, steps[0])
    method.step(on_cpu, steps[0].cpu())
    with host_synchronisation_is_an_error():
        outputs = [method.step(module, x) for x in steps[1:]]
    for x, output in zip(steps[1:], outputs, strict=True):
        assert output.device == x.device
        expected = method.step(on_cpu, x.cpu())
        assert relative_error(output.cpu(), expected) <= TOLERANCES[torch.float32], name
