"""Assertions shared by the tests of every method."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from ._methods import Method

T = TypeVar("T")
COPY_WAYS = ("pickle", "deepcopy", "torch.save")


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute error when expected is zero)."""

    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return error / scale if scale > 0.0 else error


class MatrixProducts(TorchDispatchMode):
    """
    Records the matrix products run under it, the operations a BLAS computes and rounds as the
    CPU's kernel sums: each one's name and its inputs' shapes, strides and alignment (address
    modulo 64 bytes, which some kernels' summation order depends on). Two runs that make the same
    calls on equal inputs get equal bits on any CPU; two that compute the same thing with other
    calls (a ``bmm`` for an ``mm``) may not, even where this CPU's kernels happen to agree.
    """

    _NAMES = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = func.overloadpacket.__name__
        if name in self._NAMES:
            inputs = [a for a in args if isinstance(a, Tensor)]
            self.calls.append(
                (name, *[(tuple(a.shape), a.stride(), a.data_ptr() % 64) for a in inputs])
            )
        return func(*args, **(kwargs or {}))


def assert_expected_structure(aggregator: nn.Module, matrix: Tensor) -> None:
    """The aggregation is a finite vector with one entry per column."""

    vector = aggregator(matrix)
    assert vector.shape == matrix.shape[1:]
    assert vector.isfinite().all()


def assert_permutation_invariant(aggregator: nn.Module, matrix: Tensor, *, tol: float) -> None:
    expected = aggregator(matrix)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        permutation = torch.randperm(matrix.shape[0], generator=generator)
        assert_close(aggregator(matrix[permutation]), expected, atol=tol, rtol=tol)


def assert_linear_under_scaling(aggregator: nn.Module, matrix: Tensor, *, tol: float) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        c1, c2 = torch.rand(2, matrix.shape[0], generator=generator, dtype=matrix.dtype)
        a, b = torch.rand(2, generator=generator, dtype=matrix.dtype)
        combined = aggregator(torch.diag(a * c1 + b * c2) @ matrix)
        expected = a * aggregator(torch.diag(c1) @ matrix) + b * aggregator(torch.diag(c2) @ matrix)
        assert_close(combined, expected, atol=tol, rtol=tol)


def assert_non_differentiable(aggregator: nn.Module, matrix: Tensor) -> None:
    """No autograd graph is built through the aggregation."""

    vector = aggregator(matrix.clone().requires_grad_(True))
    assert not vector.requires_grad


def state_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def assert_same_state(left: dict[str, Tensor], right: dict[str, Tensor]) -> None:
    assert left.keys() == right.keys()
    for name, value in left.items():
        assert torch.equal(value, right[name]), name


def assert_resumes_bit_identically(case: Method, inputs: Sequence[Tensor], split: int) -> None:
    """
    A checkpoint taken after ``split`` steps, saved and loaded with ``weights_only=True`` into a
    fresh instance, continues exactly as the uninterrupted run, with the same matrix products
    (:class:`MatrixProducts`), so that it does on any CPU.
    """

    uninterrupted = case.make()
    expected = []
    products = []
    for x in inputs:
        with MatrixProducts() as recorder:
            expected.append(case.step(uninterrupted, x))
        products.append(recorder.calls)

    first = case.make()
    for x in inputs[:split]:
        case.step(first, x)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = case.make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x, output, calls in zip(inputs[split:], expected[split:], products[split:], strict=True):
        with MatrixProducts() as recorder:
            assert torch.equal(case.step(resumed, x), output)
        assert recorder.calls == calls
    assert_same_state(state_tensors(resumed), state_tensors(uninterrupted))


def assert_nonfinite_step_is_skipped(
    case: Method, inputs: Sequence[Tensor], poisoned_index: int
) -> None:
    """
    A step whose input holds inf or NaN gives a non-finite output, leaves the state untouched,
    and the run then goes on as if that step had never happened.
    """

    for poison in (torch.inf, -torch.inf, torch.nan):
        clean = case.make()
        clean_outputs = [case.step(clean, x) for x in inputs]

        dirty = case.make()
        for x in inputs[:poisoned_index]:
            case.step(dirty, x)
        before = state_tensors(dirty)
        bad = inputs[poisoned_index].clone()
        bad[0, 0] = poison
        assert not case.step(dirty, bad).isfinite().all()
        if poisoned_index > 0:  # before the first step there is no state to compare yet
            assert_same_state(state_tensors(dirty), before)
        for x, output in zip(inputs[poisoned_index:], clean_outputs[poisoned_index:], strict=True):
            assert torch.equal(case.step(dirty, x), output)
        assert_same_state(state_tensors(dirty), state_tensors(clean))


def assert_compiled_matches_eager(case: Method, inputs: Sequence[Tensor], *, tol: float) -> None:
    """
    ``torch.compile(..., backend="eager", fullgraph=True)`` traces the module without a graph
    break (so no host-device synchronisation happens in its forward) and gives the eager numbers.
    """

    eager, traced = case.make(), case.make()
    torch._dynamo.reset()
    compiled = torch.compile(traced, backend="eager", fullgraph=True)
    for x in inputs:
        assert_close(case.step(traced, x, compiled), case.step(eager, x), atol=tol, rtol=tol)
    for name, value in eager.state_dict().items():
        assert_close(traced.state_dict()[name], value, atol=tol, rtol=tol)


def copy_of(value: T, how: str) -> T:
    """A copy of ``value`` by one of :data:`COPY_WAYS` (``torch.save`` of the whole object)."""

    if how == "pickle":
        copied: Any = pickle.loads(pickle.dumps(value))
    elif how == "deepcopy":
        copied = copy.deepcopy(value)
    else:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    return copied  # type: ignore[no-any-return]


def assert_equal_up_to_rounding(
    actual: Tensor, expected: Tensor, *, m: int, name: str = ""
) -> None:
    """
    ``actual`` is ``expected`` up to the rounding of sums of ``m`` terms in their dtype (another
    kernel's order of operations): within :math:`16 m \\epsilon` relatively, and that times the
    largest :math:`|expected|` absolutely. Integer tensors are equal.
    """

    if not expected.is_floating_point():
        assert torch.equal(actual, expected), name
        return
    tol = 16 * m * torch.finfo(expected.dtype).eps
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=name or None)


def assert_same_state_up_to_rounding(left: nn.Module, right: nn.Module, *, m: int) -> None:
    """The state dicts of ``left`` and ``right`` hold the same keys and values up to rounding."""

    state = left.state_dict()
    expected = right.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert_equal_up_to_rounding(state[name], value, m=m, name=name)
