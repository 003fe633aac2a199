"""
The state rules every stateful aggregator and weighting follows. Resuming and skipping a
non-finite step are checked on both solver paths (the ``solver_path`` fixture): the host kernels
of CPU tensors in eager mode, and the tensor kernels of accelerators and ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchjd import Stateful

from .._asserts import (
    assert_nonfinite_step_is_skipped,
    assert_resumes_bit_identically,
    assert_same_state,
    state_tensors,
)
from .._methods import STATEFUL, Method, jacobians

CASES = STATEFUL


def _inputs(
    case: Method, m: int = 4, count: int = 8, dtype: torch.dtype = torch.float64
) -> list[Tensor]:
    return jacobians(case, m=m, count=count, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_is_stateful(case: Method) -> None:
    assert isinstance(case.make(), Stateful)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("split", [0, 1, 3])
def test_checkpoint_resumes_bit_identically_in_a_fresh_instance(
    case: Method, split: int, solver_path: str
) -> None:
    assert_resumes_bit_identically(case, _inputs(case), split)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("poisoned_index", [0, 4])
def test_non_finite_step_leaves_the_state_untouched(
    case: Method, poisoned_index: int, solver_path: str
) -> None:
    assert_nonfinite_step_is_skipped(case, _inputs(case), poisoned_index)


def _poisoned(matrix: Tensor, kind: int) -> Tensor:
    """The ways an overflowing step shows up: one inf, one -inf, one NaN, a row, everything."""

    bad = matrix.clone()
    if kind == 0:
        bad[0, 0] = torch.inf
    elif kind == 1:
        bad[-1, -1] = -torch.inf
    elif kind == 2:
        bad[bad.shape[0] // 2, 1] = torch.nan
    elif kind == 3:
        bad[1] = torch.inf
    else:
        bad.fill_(torch.nan)
    return bad


@pytest.mark.parametrize("case", CASES, ids=str)
def test_scattered_overflow_steps_leave_the_run_unchanged(case: Method, solver_path: str) -> None:
    """
    A run with inf/NaN steps before the first clean step, in a row, and at the end gives the
    outputs and the final state of the run without them, bit for bit. The extra inputs of the
    bad steps are those of a clean step: under AMP the losses stay finite while J overflows.
    """

    inputs = _inputs(case, count=10)
    clean = case.make()
    expected = [case.step(clean, x) for x in inputs]

    bad_before = {0: [0, 4], 3: [1, 2, 3], 6: [4], 10: [0, 3]}  # clean index -> poisons before it
    dirty = case.make()
    for index in range(len(inputs) + 1):
        for kind in bad_before.get(index, []):
            source = inputs[min(index, len(inputs) - 1)]
            case.extra_inputs(dirty, source)
            assert not dirty(_poisoned(source, kind)).isfinite().all()
        if index < len(inputs):
            assert torch.equal(case.step(dirty, inputs[index]), expected[index])
    assert_same_state(state_tensors(dirty), state_tensors(clean))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reset_restores_the_initial_state(case: Method) -> None:
    inputs = _inputs(case)
    fresh = case.make()
    expected = [case.step(fresh, x) for x in inputs[4:]]

    used = case.make()
    for x in inputs[:4]:
        case.step(used, x)
    used.reset()  # type: ignore[operator]

    for x, output in zip(inputs[4:], expected, strict=True):
        assert torch.equal(case.step(used, x), output)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_change_of_task_count_resets_with_a_warning(case: Method) -> None:
    module = case.make()
    for x in _inputs(case, m=3, count=4):
        case.step(module, x)
    new_input = _inputs(case, m=5, count=1)[0]

    with pytest.warns(
        UserWarning, match=r"received 5 tasks.* after 3 tasks.*: its state was reset"
    ):
        output = case.step(module, new_input)

    fresh = case.make()
    assert torch.equal(output, case.step(fresh, new_input))
    assert_same_state(state_tensors(module), state_tensors(fresh))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("advice", ["to", "reset"])
def test_input_on_another_device_than_the_state_is_an_error_whose_advice_works(
    case: Method, advice: str
) -> None:
    module = case.make()
    case.step(module, _inputs(case, count=1)[0])
    elsewhere = _inputs(case, count=1)[0].to("meta")
    with pytest.raises(
        ValueError,
        match=r"state of .* is on cpu but the input is on meta\. Move the aggregator with "
        r"`\.to\('meta'\)`, or call `\.reset\(\)`",
    ):
        case.step(module, elsewhere)
    if advice == "to":
        module.to("meta")
    else:
        module.reset()  # type: ignore[operator]
    assert case.step(module, elsewhere).device.type == "meta"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("to_empty", [True, False], ids=["to_empty", "as is"])
@pytest.mark.parametrize("made", ["by a call on meta", "by .to('meta')"])
def test_a_state_made_on_the_meta_device_is_rebuilt_by_a_real_call(
    case: Method, made: str, to_empty: bool
) -> None:
    """
    A state made on the meta device has shapes and no values, and ``to_empty`` gives it
    uninitialised memory (a step count of 94916644891765, NaN weights): the first call on a real
    device, after ``to_empty(device="cpu")`` or not, rebuilds it with a warning, and the run is
    that of a fresh instance.
    """

    inputs = _inputs(case, count=4)
    fresh = case.make()
    expected = [case.step(fresh, x) for x in inputs]

    module = case.make()
    if made == "by a call on meta":
        assert case.step(module, inputs[0].to("meta")).device.type == "meta"
    else:
        case.step(module, inputs[0])
        module.to("meta")
    if to_empty:
        module.to_empty(device="cpu")
    with pytest.warns(
        UserWarning,
        match=r"received input on cpu but holds a state made on the meta device, which has no "
        r"values: its state was reset",
    ):
        first = case.step(module, inputs[0])
    assert torch.equal(first, expected[0])
    for x, output in zip(inputs[1:], expected[1:], strict=True):
        assert torch.equal(case.step(module, x), output)
    # (A buffer that no call fills, such as GCond's momentum with momentum_beta=0, stays empty
    # where .to() moved it.)
    assert_same_state(_filled(state_tensors(module)), _filled(state_tensors(fresh)))


def _filled(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value for name, value in state.items() if value.numel()}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_checkpoint_loaded_after_to_empty_is_kept(case: Method) -> None:
    """The usual meta-device initialisation: build on meta, ``to_empty``, load a checkpoint."""

    inputs = _inputs(case, count=6)
    source = case.make()
    expected = [case.step(source, x) for x in inputs]
    checkpoint = case.make()
    for x in inputs[:3]:
        case.step(checkpoint, x)

    with torch.device("meta"):
        module = case.make()
    case.step(module, inputs[0].to("meta"))
    module.to_empty(device="cpu")
    module.load_state_dict(checkpoint.state_dict())
    for x, output in zip(inputs[3:], expected[3:], strict=True):
        assert torch.equal(case.step(module, x), output)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_lives_in_buffers_only(case: Method) -> None:
    module = case.make()
    for x in _inputs(case, count=3):
        case.step(module, x)
    stray = [
        name
        for submodule in module.modules()
        for name, value in vars(submodule).items()
        if isinstance(value, Tensor)
    ]
    assert stray == []
    state = module.state_dict()
    assert state
    assert all(isinstance(value, Tensor) for value in state.values())
    counts = [int(v) for name, v in state.items() if name.endswith("step_count") and v.numel()]
    assert 3 in counts


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_buffer_is_listed_once_in_the_state_dict(case: Method) -> None:
    """A Gramian aggregator reaches its weighting's buffers by two paths; only one is saved."""

    module = case.make()
    for x in _inputs(case, count=2):
        case.step(module, x)
    state = module.state_dict(keep_vars=True)
    stored = [value.data_ptr() for value in state.values() if value.numel()]
    assert len(stored) == len(set(stored)), sorted(state)
    assert not any(".weighting.weighting." in f".{name}" for name in state)
