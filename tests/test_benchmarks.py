"""The benchmarks compare like with like: their reference chains compute our methods' results,
and the fit of the growth table recovers known exponents. (Timings are not tested.)"""

from __future__ import annotations

import math

import torch

from benchmarks.aggregation import _fit, golden_reference_chain
from torchjd_golden import GoldenPendulum

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
