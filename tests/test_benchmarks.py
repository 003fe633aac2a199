"""The benchmarks compare like with like: their reference chains compute our methods' results,
and the fit of the growth table recovers known exponents. (Timings are not tested.)"""

from __future__ import annotations

import math

import torch

from benchmarks.aggregation import _fit, golden_reference_chain
from benchmarks.dynamic_k import groups_of
from benchmarks.dynamic_k import reference_chain as dynamic_k_reference_chain
from torchjd_golden import DynamicK, GoldenPendulum

from ._inputs import conflicting_jacobian


def test_the_reference_chain_computes_golden_pendulum() -> None:
    for m in (2, 8, 16):
        jacobian = conflicting_jacobian(m, 500, seed=m, decades=3.0)
        torch.testing.assert_close(golden_reference_chain(jacobian), GoldenPendulum()(jacobian))


def test_the_growth_fit_recovers_the_exponents() -> None:
    samples = [
        (m, n, 3e-9 * m**1.7 * n**0.25) for m in (2, 4, 8, 16, 32) for n in (10**5, 3 * 10**5)
    ]
    a, b = _fit(samples)
    assert math.isclose(a, 1.7, abs_tol=1e-9)
    assert math.isclose(b, 0.25, abs_tol=1e-9)


def test_the_dynamic_k_reference_chain_computes_dynamic_k_across_groups() -> None:
    for m in (5, 8, 13):
        jacobian = conflicting_jacobian(m, 300, seed=m, decades=2.0, dtype=torch.float64)
        expected = DynamicK(groups_of(m), pcgrad_across_groups=True)(jacobian)
        torch.testing.assert_close(dynamic_k_reference_chain(jacobian), expected)
