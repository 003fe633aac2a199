"""
Property-based tests (hypothesis) on Jacobians with zero, duplicate and anti-parallel rows and row
norms spanning twelve decades: outputs are finite, and weights are non-negative and normalised
where the method says so, over single calls and over sequences of calls of the stateful ones.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from torchjd_golden import ExcessMTLWeighting, GABAWeighting, GoldenPendulumWeighting

from .._methods import AGGREGATORS, METHODS, Method

# Derandomised so that CI runs the same examples every time.
settings.register_profile("torchjd-golden", derandomize=True, deadline=None, max_examples=60)
settings.load_profile("torchjd-golden")

DTYPES = st.sampled_from([torch.float32, torch.float64])
ROW_KINDS = ("random", "zero", "duplicate", "anti-parallel")


@st.composite
def jacobians(draw: st.DrawFn, m: int | None = None, n: int | None = None) -> Tensor:
    """
    An m x n float64 Jacobian whose rows are random directions, zero, copies of an earlier row
    or earlier rows reversed and rescaled, with norms from 1e-6 to 1e7.
    """

    # sampled_from rather than integers: hypothesis leans integers towards their minimum.
    m = draw(st.sampled_from(range(1, 9))) if m is None else m
    n = draw(st.sampled_from(range(1, 13))) if n is None else n
    seed = draw(st.integers(0, 2**31 - 1))
    directions = torch.randn(
        m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    rows: list[Tensor] = []
    for k in range(m):
        kind = draw(st.sampled_from(ROW_KINDS if k else ROW_KINDS[:2]))
        scale = 10.0 ** draw(st.sampled_from(range(-6, 7))) * draw(st.floats(1.0, 10.0))
        if kind == "random":
            rows.append(scale * directions[k] / directions[k].norm())
        elif kind == "zero":
            rows.append(torch.zeros(n, dtype=torch.float64))
        else:
            source = rows[draw(st.integers(0, k - 1))]
            if kind == "duplicate":
                rows.append(source.clone())
            else:
                norm = source.norm()
                rows.append(-scale * source / norm if norm > 0 else source.clone())
    return torch.stack(rows)


@st.composite
def sequences(draw: st.DrawFn) -> list[Tensor]:
    """Several Jacobians of one shape, as successive training steps."""

    m, n = draw(st.sampled_from(range(1, 7))), draw(st.sampled_from(range(1, 11)))
    return draw(st.lists(jacobians(m, n), min_size=2, max_size=12))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _assert_on_simplex(weights: Tensor, dtype: torch.dtype) -> None:
    assert weights.isfinite().all(), weights
    assert (weights >= 0).all(), weights
    assert abs(float(weights.double().sum()) - 1.0) <= _tolerance(dtype) * weights.numel()


BY_NAME = {method.name: method for method in METHODS}
STATEFUL_AGGREGATORS = sorted(method.name for method in AGGREGATORS if method.stateful)
SIMPLEX_WEIGHTINGS = sorted(method.name for method in METHODS if method.simplex_weights)


def _call(method: Method, module: torch.nn.Module, jacobian: Tensor, losses: Tensor) -> Tensor:
    if method.needs_extra_inputs:
        module.losses = losses  # type: ignore[assignment]
    return module(method.input_of(jacobian))


@given(
    jacobian=jacobians(), dtype=DTYPES, name=st.sampled_from(sorted(m.name for m in AGGREGATORS))
)
def test_one_call_gives_a_finite_output(jacobian: Tensor, dtype: torch.dtype, name: str) -> None:
    method = BY_NAME[name]
    losses = jacobian.norm(dim=1) ** 2 + 1e-3
    output = _call(method, method.make(), jacobian.to(dtype), losses)
    assert output.shape == jacobian.shape[1:]
    assert output.dtype == dtype
    assert output.isfinite().all(), output


@settings(max_examples=40)
@given(
    steps=sequences(),
    dtype=DTYPES,
    name=st.sampled_from(STATEFUL_AGGREGATORS),
    loss_exponents=st.lists(st.floats(-6.0, 6.0), min_size=6, max_size=6),
)
def test_stateful_outputs_stay_finite_over_many_calls(
    steps: list[Tensor], dtype: torch.dtype, name: str, loss_exponents: list[float]
) -> None:
    method = BY_NAME[name]
    aggregator = method.make()
    m = steps[0].shape[0]
    losses = 10.0 ** torch.tensor(loss_exponents[:m], dtype=dtype)
    for jacobian in steps:
        output = _call(method, aggregator, jacobian.to(dtype), losses)
        assert output.isfinite().all(), output
    for value in aggregator.state_dict().values():
        assert not value.is_floating_point() or value.isfinite().all()


@given(steps=sequences(), dtype=DTYPES, name=st.sampled_from(SIMPLEX_WEIGHTINGS))
def test_simplex_weights_stay_on_the_simplex(
    steps: list[Tensor], dtype: torch.dtype, name: str
) -> None:
    method = BY_NAME[name]
    weighting = method.make()
    for jacobian in steps:
        _assert_on_simplex(_call(method, weighting, jacobian.to(dtype), torch.ones(1)), dtype)


@given(jacobian=jacobians(), dtype=DTYPES, pcgrad=st.booleans())
def test_golden_pendulum_alpha_is_on_the_simplex_and_its_weights_non_negative(
    jacobian: Tensor, dtype: torch.dtype, pcgrad: bool
) -> None:
    """α solves a QP on the simplex; the weights are α over the norms, times PCGrad's
    coefficients, which only ever add positive multiples of conflicting rows."""

    matrix = jacobian.to(dtype)
    weighting = GoldenPendulumWeighting(pcgrad=pcgrad)
    weights = weighting(matrix @ matrix.T)
    assert weighting.alpha is not None
    _assert_on_simplex(weighting.alpha, dtype)
    assert weights.isfinite().all()
    assert (weights >= 0).all(), weights


@given(steps=sequences(), dtype=DTYPES, beta=st.floats(0.0, 0.999), min_weight=st.floats(0, 0.2))
def test_gaba_weights_stay_on_the_simplex_above_their_floor(
    steps: list[Tensor], dtype: torch.dtype, beta: float, min_weight: float
) -> None:
    """``w = max(e, w_min) / sum(max(e, w_min))`` with ``sum(e) = 1``, so every weight is at
    least ``w_min / (1 + m w_min)``."""

    weighting = GABAWeighting(beta=beta, warmup_steps=0, min_weight=min_weight)
    for jacobian in steps:
        matrix = jacobian.to(dtype)
        weights = weighting(matrix @ matrix.T)
        _assert_on_simplex(weights, dtype)
        floor = min_weight / (1.0 + len(weights) * min_weight)
        assert (weights >= floor * (1.0 - _tolerance(dtype))).all(), weights


@given(steps=sequences(), dtype=DTYPES, step_size=st.floats(1e-3, 10.0))
def test_excess_mtl_weights_stay_on_the_simplex_for_any_step_size(
    steps: list[Tensor], dtype: torch.dtype, step_size: float
) -> None:
    weighting = ExcessMTLWeighting(robust_step_size=step_size, n_warmup_steps=1)
    for jacobian in steps:
        _assert_on_simplex(weighting(jacobian.to(dtype)), dtype)
