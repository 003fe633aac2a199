"""
What a careless user does to every method of the registry: change the precision between calls,
convert the module, call it first under ``torch.inference_mode()``, feed it huge but finite
gradients, load half a checkpoint, and trigger the reset warning through ``jac_to_grad``. Each
case is driven by ``_methods.py``, so a new method inherits all of them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchjd.autojac import backward, jac_to_grad

from .._asserts import relative_error
from .._inputs import conflicting_jacobian
from .._methods import AGGREGATORS, METHODS, STATEFUL, Method

# Adaptive's losses are its extra input; the rest take the Jacobian (or Gramian) alone.
PLAIN_AGGREGATORS = [method for method in AGGREGATORS if not method.needs_extra_inputs]


def _jacobians(count: int, dtype: torch.dtype = torch.float32, m: int = 4) -> list[Tensor]:
    return [conflicting_jacobian(m, 30, seed=s, decades=2.0, dtype=dtype) for s in range(count)]


def _rounding_tolerance(dtype: torch.dtype, m: int = 4) -> float:
    """A relative error of a few steps' rounding in ``dtype`` (float64 carries no error here)."""

    return 8.0 * m * torch.finfo(dtype).eps


def _step_recording_resets(method: Method, module: nn.Module, stat: Tensor) -> tuple[Tensor, bool]:
    """The output of a step, and whether the module said that it reset its state; no other
    warning is allowed."""

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = method.step(module, stat)
    messages = [str(warning.message) for warning in caught]
    assert all("state was reset" in message for message in messages), messages
    return output, bool(messages)


@pytest.mark.parametrize("method", STATEFUL, ids=str)
def test_a_change_of_precision_between_calls_rebuilds_or_converts_the_state(
    method: Method,
) -> None:
    """
    A float32 call, then float64 ones, then float32 again: each output has the input's dtype and
    the value of a float64 run on the same (rounded) inputs, a run that starts afresh wherever
    the module said that it reset its state.
    """

    module, reference = method.make(), method.make()
    dtypes = [torch.float32, torch.float64, torch.float64, torch.float32]
    for dtype, jacobian in zip(dtypes, _jacobians(4, torch.float64), strict=True):
        stat = method.input_of(jacobian.to(dtype))
        output, reset = _step_recording_resets(method, module, stat)
        if reset:
            reference = method.make()
        expected = method.step(reference, stat.double())
        assert output.dtype == dtype
        assert relative_error(output, expected) <= _rounding_tolerance(torch.float32), dtype


@pytest.mark.parametrize("method", STATEFUL, ids=str)
@pytest.mark.parametrize("conversion", ["double", "half", "float"])
def test_converting_the_module_that_holds_it(method: Method, conversion: str) -> None:
    """
    As a submodule of a model on which .double(), .half() or .float() is called: the run goes on
    as a fresh instance loaded with the converted checkpoint would, and gives the value of a
    float64 run on the same (rounded) inputs, started afresh where the module reset its state.
    """

    model = nn.Module()
    model.aggregator = method.make()
    dtype = {"double": torch.float64, "half": torch.float16, "float": torch.float32}[conversion]
    steps = [method.input_of(jacobian) for jacobian in _jacobians(4)]
    reference = method.make()
    for stat in steps[:2]:
        method.step(model.aggregator, stat)
        method.step(reference, stat.double())
    converted = {
        name: value.to(dtype) if value.is_floating_point() else value
        for name, value in model.aggregator.state_dict().items()
    }
    loaded = method.make()
    loaded.load_state_dict(converted)

    getattr(model, conversion)()
    assert all(
        value.dtype == dtype
        for value in model.aggregator.state_dict().values()
        if value.is_floating_point()
    )
    for stat in (step.to(dtype) for step in steps[2:]):
        output, reset = _step_recording_resets(method, model.aggregator, stat)
        assert output.dtype == dtype
        assert torch.equal(output, _step_recording_resets(method, loaded, stat)[0])
        if reset:
            reference = method.make()
        expected = method.step(reference, stat.double())
        # The state carries the rounding of its float32 steps, then that of dtype.
        tolerance = max(_rounding_tolerance(torch.float32), _rounding_tolerance(dtype))
        assert relative_error(output, expected) <= tolerance


@pytest.mark.parametrize("method", STATEFUL, ids=str)
def test_a_first_call_under_inference_mode_leaves_usable_state(method: Method) -> None:
    """
    The state is made of normal tensors even when created under ``torch.inference_mode()``, so
    the training calls that follow update it in place; the run equals one without that mode.
    """

    inputs = [method.input_of(j) for j in _jacobians(4, torch.float64)]
    plain = method.make()
    expected = [method.step(plain, x) for x in inputs]

    module = method.make()
    with torch.inference_mode():
        first = method.step(module, inputs[0])
    assert torch.equal(first, expected[0])
    for x, output in zip(inputs[1:], expected[1:], strict=True):
        assert torch.equal(method.step(module, x), output)


@pytest.mark.parametrize("method", PLAIN_AGGREGATORS, ids=str)
def test_huge_but_finite_float32_gradients_give_the_float64_result(method: Method) -> None:
    """Rows up to 1e20 (their squares overflow float32): finite, and float64's numbers."""

    generator = torch.Generator().manual_seed(3)
    scales = torch.tensor([[1e20], [1e19], [1.0], [3e19], [1e-3]])
    low, high = method.make(), method.make()
    for _ in range(4):
        jacobian = (torch.randn(5, 200, generator=generator) * scales).float()
        output, expected = low(jacobian), high(jacobian.double())
        assert output.isfinite().all()
        assert relative_error(output, expected) < 1e-5


@pytest.mark.parametrize("method", STATEFUL, ids=str)
def test_half_a_checkpoint_is_refused_with_a_message(method: Method) -> None:
    module = method.make()
    for jacobian in _jacobians(2):
        method.step(module, method.input_of(jacobian))
    state = module.state_dict()
    partial = dict(list(state.items())[: max(1, len(state) // 2)])
    with pytest.raises(RuntimeError, match="all or nothing: the checkpoint lacks"):
        method.make().load_state_dict(partial, strict=False)


@pytest.mark.parametrize(
    "method", [m for m in STATEFUL if m.is_aggregator and not m.needs_extra_inputs], ids=str
)
def test_the_reset_warning_points_at_the_users_line(method: Method) -> None:
    """Called directly and through jac_to_grad: the warning names this file, not torch's."""

    aggregator = method.make()
    aggregator(torch.randn(3, 6))
    with pytest.warns(UserWarning, match="state was reset") as direct:
        aggregator(torch.randn(4, 6))
    assert Path(direct[0].filename) == Path(__file__)

    parameter = torch.randn(6, requires_grad=True)
    backward(torch.stack([(parameter * k).sum() for k in range(1, 4)]), inputs=[parameter])
    with pytest.warns(UserWarning, match="state was reset") as through:
        jac_to_grad([parameter], aggregator)
    assert Path(through[0].filename) == Path(__file__)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_method_names_bad_task_names(method: Method) -> None:
    with pytest.raises(ValueError, match="`tasks`"):
        method.make().tasks = "abc"
    module = method.make()
    module.tasks = ["a", "b"]
    with pytest.raises(ValueError, match="task names"):
        method.step(module, method.input_of(torch.randn(3, 6)))
