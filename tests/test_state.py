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

from ._asserts import (
    assert_nonfinite_step_is_skipped,
    assert_resumes_bit_identically,
    assert_same_state,
    state_tensors,
)
from ._methods import STATEFUL, Method, jacobians

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
def test_input_on_another_device_than_the_state_is_an_error(case: Method) -> None:
    module = case.make()
    case.step(module, _inputs(case, count=1)[0])
    elsewhere = _inputs(case, count=1)[0].to("meta")
    with pytest.raises(ValueError, match=r"state of .* is on cpu but the input is on meta"):
        case.step(module, elsewhere)


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
