"""
The checks every method and variant of the registry (``_methods.py``) passes: torchjd's generic
aggregator properties (structure, non-differentiability, the invariances each claims), compilation
without graph breaks, representations, and validated, forwarded hyper-parameters.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from .._asserts import (
    assert_compiled_matches_eager,
    assert_equal_up_to_rounding,
    assert_expected_structure,
    assert_non_differentiable,
    assert_same_state_up_to_rounding,
)
from .._inputs import conflicting_jacobian, scaled_matrices, typical_matrices
from .._methods import AGGREGATORS, METHODS, Method, jacobians, weighting_of

WITH_BAD_VALUES = [method for method in METHODS if method.bad_values]
WITH_GOOD_VALUES = [method for method in METHODS if method.good_values]


def _fresh_call(method: Method, matrix: Tensor) -> Tensor:
    """The aggregation of ``matrix`` by a new instance (stateful methods: their first call)."""

    return method.step(method.make(), method.input_of(matrix))


@pytest.mark.parametrize("matrix", typical_matrices + scaled_matrices)
@pytest.mark.parametrize("method", AGGREGATORS, ids=str)
def test_expected_structure(method: Method, matrix: Tensor) -> None:
    aggregator = method.make()
    method.extra_inputs(aggregator, matrix)
    assert_expected_structure(aggregator, matrix)


@pytest.mark.parametrize("matrix", typical_matrices)
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_non_differentiable(method: Method, matrix: Tensor) -> None:
    module = method.make()
    stat = method.input_of(matrix)
    method.extra_inputs(module, stat)
    assert_non_differentiable(module, stat)


def _invariance_case(method: Method, invariance: str) -> bool:
    return method.is_aggregator and invariance in method.invariances


@pytest.mark.parametrize(
    "method", [m for m in METHODS if _invariance_case(m, "permutation")], ids=str
)
def test_permutation_invariance(method: Method) -> None:
    jacobian = conflicting_jacobian(5, 12, seed=1, decades=3.0)
    expected = _fresh_call(method, jacobian)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        permutation = torch.randperm(5, generator=generator)
        assert_close(_fresh_call(method, jacobian[permutation]), expected)


@pytest.mark.parametrize(
    "method", [m for m in METHODS if _invariance_case(m, "row scaling")], ids=str
)
def test_positive_row_scaling_invariance(method: Method) -> None:
    jacobian = conflicting_jacobian(4, 20, seed=2, decades=0.0)
    scales = torch.tensor([1e-3, 2.0, 7.0, 1e4], dtype=torch.float64)
    assert_close(_fresh_call(method, scales.unsqueeze(1) * jacobian), _fresh_call(method, jacobian))


@pytest.mark.parametrize(
    "method", [m for m in METHODS if _invariance_case(m, "scale-free")], ids=str
)
def test_scale_free(method: Method) -> None:
    jacobian = conflicting_jacobian(4, 12, seed=2, decades=2.0)
    assert_close(_fresh_call(method, 1e4 * jacobian), _fresh_call(method, jacobian))


@pytest.mark.parametrize(
    "method", [m for m in METHODS if _invariance_case(m, "homogeneous")], ids=str
)
def test_positively_homogeneous(method: Method) -> None:
    jacobian = conflicting_jacobian(4, 12, seed=2, decades=2.0)
    assert_close(_fresh_call(method, 1e4 * jacobian), 1e4 * _fresh_call(method, jacobian))


@pytest.mark.parametrize("method", [m for m in METHODS if m.sync_free_calls], ids=str)
def test_compiled_matches_eager(method: Method) -> None:
    """Traces with fullgraph=True (no host sync, no graph break) and gives the eager numbers."""

    count = torch._dynamo.config.recompile_limit + 2 if method.stateful else 3
    assert_compiled_matches_eager(method, jacobians(method, count=count), tol=1e-10)


def _first_of_each_class(methods: list[Method]) -> list[Method]:
    first: dict[object, Method] = {}
    for method in methods:
        first.setdefault(method.factory, method)
    return list(first.values())


# One case per method, each compile by inductor costing seconds: the first entry of each
# aggregator class (an aggregator runs its weighting's kernels).
INDUCTOR_CASES = _first_of_each_class(AGGREGATORS)


@pytest.mark.parametrize("method", INDUCTOR_CASES, ids=str)
def test_inductor_matches_eager(method: Method) -> None:
    """
    The default backend compiles the method without a graph break and gives the eager numbers
    and state: a step that writes the state, then one that reads it.
    """

    m = 3
    first, *inputs = jacobians(method, m=m, count=3, n=8)
    eager, traced = method.make(), method.make()
    method.step(eager, first)
    method.step(traced, first)  # the state exists: one graph for the calls below
    torch._dynamo.reset()
    compiled = torch.compile(traced, fullgraph=True)
    for x in inputs:
        expected = method.step(eager, x)
        assert_equal_up_to_rounding(method.step(traced, x, compiled), expected, m=m)
    assert_same_state_up_to_rounding(traced, eager, m=m)


@pytest.mark.parametrize("method", [m for m in METHODS if m.expected_repr], ids=str)
def test_representations(method: Method) -> None:
    module = method.make()
    assert repr(module) == method.expected_repr
    if method.is_aggregator:  # torchjd's weightings keep nn.Module's str
        assert str(module) == type(module).__name__


@pytest.mark.parametrize(
    ("method", "name", "value"),
    [(method, name, value) for method in WITH_BAD_VALUES for name, value in method.bad_values],
    ids=lambda v: str(v) if isinstance(v, Method) else repr(v)[:24],
)
def test_bad_hyper_parameters_are_named(method: Method, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        setattr(method.make(), name, value)
    with pytest.raises(ValueError, match=f"`{name}`"):
        method.make(**{name: value})


@pytest.mark.parametrize(
    ("method", "name", "value"),
    [(method, name, value) for method in WITH_GOOD_VALUES for name, value in method.good_values],
    ids=lambda v: str(v) if isinstance(v, Method) else repr(v)[:24],
)
def test_hyper_parameters_are_set_on_the_weighting(
    method: Method, name: str, value: object
) -> None:
    """Setting a parameter (on an aggregator: on its weighting too) is what the constructor does."""

    module = method.make()
    setattr(module, name, value)
    assert getattr(module, name) == value
    assert repr(module) == repr(method.make(**{name: value}))
    if method.is_aggregator:
        inner: nn.Module = weighting_of(module)
        if hasattr(type(inner), name):  # GCond's momentum_beta is the aggregator's own
            assert getattr(inner, name) == value


@pytest.mark.parametrize("method", AGGREGATORS, ids=str)
def test_an_aggregator_takes_its_weightings_parameters(method: Method) -> None:
    """
    Both constructors are written out (for the reader, the type checker and the docs) and the
    aggregator builds its weighting from its own arguments by name, so they must agree: the same
    parameters in the same order, with the same defaults and types (GCond adds its momentum).
    """

    aggregator = method.make()
    ours = inspect.signature(type(aggregator)).parameters
    theirs = inspect.signature(type(weighting_of(aggregator))).parameters
    assert [p for p in ours.values() if p.name in theirs] == list(theirs.values())
    assert type(aggregator).hyperparameter_names() == tuple(ours)


@pytest.mark.parametrize("method", AGGREGATORS, ids=str)
def test_forwarded_properties_carry_the_weightings_types_and_docstrings(method: Method) -> None:
    """So that type checkers refuse ``GoldenPendulum().lam = "oops"`` and the docs show them."""

    aggregator_class = type(method.make())
    weighting_class = type(weighting_of(method.make()))
    forwarded = [
        name
        for name, value in vars(aggregator_class).items()
        if isinstance(value, property)
        and isinstance(getattr(weighting_class, name, None), property)
    ]
    assert forwarded
    for name in forwarded:
        ours, theirs = vars(aggregator_class)[name], getattr(weighting_class, name)
        assert ours.__doc__ == theirs.__doc__, name
        assert ours.fget.__annotations__["return"] == theirs.fget.__annotations__["return"], name
        assert (ours.fset is None) == (theirs.fset is None), name
