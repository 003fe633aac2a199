"""
Hundreds of tasks: every aggregator at m = 64, 200 and 512, in float32, float16 and bfloat16,
against float64 on the same rounded input, and Golden Pendulum and ExcessMTL against their
references at these sizes.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL

from torchjd_golden import ExcessMTL, GoldenPendulum

from .._asserts import relative_error
from .._inputs import conflicting_jacobian
from .._knife_edge import golden_qp_branches, knife_edge_threshold, tight_tolerance
from .._methods import AGGREGATORS, Method
from .test_golden_pendulum import reference_gradient

SIZES = [64, 200, 512]
# Units of each dtype's rounding: a half-precision output is float32 work rounded once (measured:
# at most 1.1 units), a float32 one accumulates rounding over m-long sums (at most 13 units).
TOLERANCES = {
    dtype: units * torch.finfo(dtype).eps
    for dtype, units in ((torch.float32, 64), (torch.float16, 4), (torch.bfloat16, 4))
}
PLAIN = [method for method in AGGREGATORS if not method.needs_extra_inputs]
# GCond's arbitration is not continuous: the pair it resolves is an argmin over the cosines, and
# which row of a pair wins (so which one is scaled by sin(angle) > sin(pi / 2)) is a comparison of
# scores. Among the m(m - 1)/2 pairs and 2m iterations of m = 200, two candidates within float32
# rounding of each other occur, and a float32 run may then take the other branch than float64
# (measured: 8e-2 relative once in nine runs). Such methods meet float64 here on inputs whose
# products are exact in float32, where both runs take every branch alike.
CONTINUOUS = [method for method in PLAIN if not method.name.startswith("GCond")]


def _steps(m: int, dtype: torch.dtype, count: int = 2) -> list[Tensor]:
    return [conflicting_jacobian(m, 300, seed=seed, decades=2.0).to(dtype) for seed in range(count)]


def _integer_steps(m: int, dtype: torch.dtype, count: int = 2) -> list[Tensor]:
    """
    Conflicting rows of small integers: exact in every dtype, and every inner product of two rows
    (at most 300 * 64) is an integer below 2**24, exact in float32 as in float64.
    """

    generator = torch.Generator().manual_seed(m)
    steps = []
    for _ in range(count):
        shared = torch.randint(-4, 5, (3, 300), generator=generator)
        mixing = torch.randint(-2, 3, (m, 3), generator=generator)
        noise = torch.randint(-1, 2, (m, 300), generator=generator)
        steps.append(((mixing @ shared).clamp(-8, 8) + noise).to(dtype))
    return steps


def _assert_meets_float64(method: Method, steps: list[Tensor], dtype: torch.dtype) -> None:
    low, high = method.make(), method.make()
    for jacobian in steps:
        output, expected = low(jacobian), high(jacobian.double())
        assert output.dtype == dtype
        assert torch.isfinite(output).all()
        assert relative_error(output.double(), expected) <= TOLERANCES[dtype]


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("method", CONTINUOUS, ids=str)
def test_many_tasks_meet_float64_on_the_same_rounded_input(
    method: Method, m: int, dtype: torch.dtype
) -> None:
    _assert_meets_float64(method, _steps(m, dtype), dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("method", PLAIN, ids=str)
def test_many_tasks_meet_float64_where_the_products_are_exact(
    method: Method, m: int, dtype: torch.dtype
) -> None:
    _assert_meets_float64(method, _integer_steps(m, dtype), dtype)


@pytest.mark.parametrize("m", SIZES)
def test_golden_pendulum_of_many_tasks_matches_golden_nash_backward(m: int) -> None:
    # In float64, where the reference's own golden targets do not overflow (m < 1475), and clear
    # of a knife edge of its QP (tests/_knife_edge.py), where its result would depend on the CPU.
    jacobian = conflicting_jacobian(m, 2 * m, seed=m, decades=6.0)
    rows = jacobian / jacobian.norm(dim=1, keepdim=True)
    _, margin = golden_qp_branches(rows @ rows.T, lam=0.5)
    assert margin > knife_edge_threshold(m, torch.float64)
    expected_gradient, expected_alpha = reference_gradient(jacobian)
    aggregator = GoldenPendulum()

    assert relative_error(aggregator(jacobian), expected_gradient) <= tight_tolerance(
        m, torch.float64
    )
    assert relative_error(aggregator.alpha, expected_alpha) <= tight_tolerance(m, torch.float64)


@pytest.mark.parametrize("m", SIZES)
def test_excess_mtl_of_many_tasks_matches_torchjd(m: int) -> None:
    ours, theirs = ExcessMTL(), TorchJDExcessMTL()
    for jacobian in _steps(m, torch.float64, count=3):
        assert relative_error(ours(jacobian), theirs(jacobian)) <= tight_tolerance(m, torch.float64)
