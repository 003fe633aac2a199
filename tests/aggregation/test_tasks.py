"""
Tasks by name: with ``.tasks`` set, per-task state follows the names (an absent task keeps its
state, a new one starts afresh, a new order follows the names), global state continues, and
nothing resets or warns; the names travel in checkpoints.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Sequence

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

from torchjd_golden import GABA, ExcessMTL, GCond, GCondWeighting, GoldenPendulum
from torchjd_golden.aggregation._kernels import gcond as gcond_kernel

from .._asserts import (
    assert_equal_up_to_rounding,
    assert_same_state,
    assert_same_state_up_to_rounding,
    state_tensors,
)
from .._inputs import conflicting_jacobian
from .._methods import STATEFUL, Method, weighting_of

NAMES = ("a", "b", "c", "d")
ORDER_FREE = [method for method in STATEFUL if "permutation" in method.invariances]
# Every stateful method whose per-task state is rows of buffers (GCond's is in its own tests).
ROW_STATE = [
    method for method in STATEFUL if "GCond" not in method.name and "Adaptive" not in method.name
]


def _named_call(method: Method, module: nn.Module, names: Sequence[Hashable], seed: int) -> Tensor:
    """One call on a Jacobian whose row for each task is the same whatever the other tasks are."""

    rows = [_task_row(name, seed) for name in names]
    module.tasks = list(names)  # type: ignore[assignment]
    return method.step(module, method.input_of(torch.stack(rows)))


def _task_row(name: Hashable, seed: int) -> Tensor:
    """Task ``name``'s gradient at step ``seed``: conflicting directions over four decades."""

    jacobian = conflicting_jacobian(len(NAMES), 24, seed=seed, decades=4.0)
    return jacobian[NAMES.index(name)]  # type: ignore[arg-type]


def _run(method: Method, schedule: Sequence[Sequence[str]]) -> tuple[nn.Module, list[Tensor]]:
    module = method.make()
    outputs = [_named_call(method, module, names, step) for step, names in enumerate(schedule)]
    return module, outputs


def _per_task(module: nn.Module, name: Hashable) -> dict[str, Tensor]:
    """The per-task state of task ``name`` (the rows of the per-task buffers)."""

    inner = weighting_of(module) if hasattr(module, "weighting") else module
    row = inner.known_tasks.index(name)
    return {buffer: getattr(inner, buffer)[row].clone() for buffer in inner._per_task_names}


@pytest.mark.parametrize("method", ORDER_FREE, ids=str)
def test_permuting_rows_and_names_together_changes_nothing(method: Method) -> None:
    orders = [NAMES, ("c", "a", "d", "b"), ("d", "c", "b", "a"), ("b", "d", "a", "c"), NAMES]
    fixed, expected = _run(method, [NAMES] * len(orders))
    permuted, outputs = _run(method, orders)
    for order, output, reference in zip(orders, outputs, expected, strict=True):
        if method.is_aggregator:
            torch.testing.assert_close(output, reference, rtol=1e-12, atol=1e-14)
        else:  # the weights follow the rows
            positions = [NAMES.index(name) for name in order]
            torch.testing.assert_close(output, reference[positions], rtol=1e-12, atol=1e-14)
    for name in NAMES:
        for buffer, value in _per_task(permuted, name).items():
            torch.testing.assert_close(value, _per_task(fixed, name)[buffer], msg=buffer)


@pytest.mark.parametrize("method", STATEFUL, ids=str)
def test_an_absent_task_keeps_its_state_and_global_state_continues(method: Method) -> None:
    schedule = [NAMES, NAMES, NAMES, ("a", "b", "d"), ("d", "a"), ("a", "b", "d"), NAMES]
    module = method.make()
    for step, names in enumerate(schedule[:3]):
        _named_call(method, module, names, step)
    before = _per_task(module, "c")
    for step, names in enumerate(schedule[3:6], start=3):
        assert _named_call(method, module, names, step).isfinite().all()
        for buffer, value in _per_task(module, "c").items():
            assert torch.equal(value, before[buffer]), buffer  # untouched while absent
    _named_call(method, module, schedule[6], 6)
    counts = [
        int(v) for k, v in module.state_dict().items() if k.endswith("step_count") and v.numel()
    ]
    assert len(schedule) in counts  # every call counted: nothing was reset (and no warning)


@pytest.mark.parametrize("method", ROW_STATE, ids=str)
def test_during_an_absence_the_others_evolve_as_if_alone(method: Method) -> None:
    """
    A call's present tasks depend only on their own per-task state and the shared state: a module
    that knows only them, with the same state, gives the same outputs.
    """

    full = method.make()
    for step in range(3):
        _named_call(method, full, NAMES, step)
    present = ("d", "a")
    alone = _restricted_copy(method, full, present)
    for step in range(3, 6):
        torch.testing.assert_close(
            _named_call(method, full, present, step),
            _named_call(method, alone, present, step),
            rtol=0.0,
            atol=0.0,
        )


def _restricted_copy(method: Method, module: nn.Module, names: Sequence[str]) -> nn.Module:
    """A fresh module whose state is ``module``'s restricted to the tasks ``names``."""

    copy = method.make()
    copy.load_state_dict(module.state_dict())
    inner = weighting_of(copy) if method.is_aggregator else copy
    rows = torch.tensor([inner.known_tasks.index(name) for name in names])
    for buffer in inner._per_task_names:
        inner._buffers[buffer] = inner._buffers[buffer].index_select(0, rows)
    inner._known_tasks = list(names)
    return copy


@pytest.mark.parametrize(
    ("method", "initial"),
    [
        (Method("GABAWeighting", GABA, {"warmup_steps": 0}), {"ema_weights": 1.0 / 3.0}),
        (
            Method("ExcessMTL", ExcessMTL),
            {"task_weights": 1.0 / 3.0, "sq_grad_sum": 0.0, "task_steps": 0, "baseline": 0.0},
        ),
        (Method("GCond", GCond), {"norm_ema": 1.0}),
    ],
    ids=["GABA", "ExcessMTL", "GCond"],
)
def test_a_new_task_starts_from_the_initial_per_task_state(
    method: Method, initial: dict[str, float]
) -> None:
    """GABA and ExcessMTL start a task at 1/m of the call's tasks; GCond's norm average at 1."""

    module = method.make()
    for step in range(3):
        _named_call(method, module, ("a", "b"), step)
    poisoned = torch.stack([_task_row(name, 3) for name in ("a", "b", "c")])
    poisoned[0, 0] = torch.nan  # the state is then left as it was, with c's fresh rows added
    module.tasks = ["a", "b", "c"]  # type: ignore[assignment]
    assert not module(poisoned).isfinite().all()
    for buffer, value in _per_task(module, "c").items():
        if buffer in initial:
            assert torch.all(value == initial[buffer]), buffer


@pytest.mark.parametrize("method", STATEFUL, ids=str)
@pytest.mark.parametrize("split", [2, 4, 6])
def test_a_checkpoint_with_changing_names_resumes_bit_identically(
    method: Method, split: int
) -> None:
    schedule = [NAMES, ("b", "a"), ("a", "b", "c"), ("c", "d"), NAMES, ("d", "c", "b", "a"), NAMES]
    uninterrupted, expected = _run(method, schedule)

    first, _ = _run(method, schedule[:split])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = method.make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.known_tasks == first.known_tasks
    for step in range(split, len(schedule)):
        output = _named_call(method, resumed, schedule[step], step)
        assert torch.equal(output, expected[step])
    assert_same_state(state_tensors(resumed), state_tensors(uninterrupted))


def test_gcond_scores_stability_on_the_tasks_of_both_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The stability score reads <r_i, p_i>, p_i the task's resolved row of the previous call: for a
    task absent from that call, p_i is zero (as on a first step); for the others, it is their own
    row of the previous call, whatever its position.
    """

    captured: list[dict[str, Tensor]] = []
    resolve = gcond_kernel.resolve_conflicts

    def spy(gramian: Tensor, cross: Tensor, previous_norms_sq: Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        resolution = resolve(gramian, cross, previous_norms_sq, *args, **kwargs)
        captured.append({"cross": cross, "norms": previous_norms_sq, "c": resolution.coefficients})
        return resolution

    monkeypatch.setattr("torchjd_golden.aggregation._gcond._weighting.resolve_conflicts", spy)
    weighting = GCondWeighting()
    calls = [("a", "b", "c"), ("b", "d"), ("d", "b", "a")]
    jacobians = []
    for step, names in enumerate(calls):
        weighting.tasks = names
        jacobian = torch.stack([_task_row(name, step) for name in names])
        jacobians.append(jacobian)
        weighting(jacobian)

    previous = captured[1]["c"] @ jacobians[1]  # the resolved rows of call 1: b, then d
    last = captured[2]
    expected = (
        jacobians[2] @ torch.stack([previous[1], previous[0]]).T
    )  # d and b, in call 2's order
    torch.testing.assert_close(last["cross"][:, :2], expected)
    torch.testing.assert_close(
        last["norms"][:2], (torch.stack([previous[1], previous[0]]) ** 2).sum(1)
    )
    assert torch.equal(last["cross"][:, 2], torch.zeros(3, dtype=torch.float64))  # a: absent
    assert float(last["norms"][2]) == 0.0


def test_gcond_winner_history_holds_tasks_not_positions() -> None:
    """Winners are recorded as tasks: a call on (c, a) appends c's or a's row, never row 1 (b)."""

    weighting = GCondWeighting(dominance_window=8)
    weighting.tasks = ["a", "b", "c"]
    weighting(torch.stack([_task_row(name, 0) for name in ("a", "b", "c")]))
    count = int(weighting.winner_count)
    weighting.tasks = ["c", "a"]
    weighting(torch.stack([-_task_row("a", 1), _task_row("a", 1)]))  # c = -a: they conflict
    appended = weighting.winner_history.tolist()[count : int(weighting.winner_count)]
    assert appended
    assert set(appended) <= {weighting.known_tasks.index("a"), weighting.known_tasks.index("c")}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "sequence of task names"),
        (["a", "a"], "distinct"),
        ([["unhashable"]], "strings or integers"),
        ([object()], "strings or integers"),
        ([True], "strings or integers"),
    ],
)
def test_bad_names_are_named(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GABA().tasks = value  # type: ignore[assignment]


def test_names_and_rows_must_agree() -> None:
    aggregator = GoldenPendulum()
    aggregator.tasks = ["a", "b"]
    with pytest.raises(ValueError, match=r"told 2 task names .* but received 3 rows"):
        aggregator(torch.randn(3, 5))


def test_names_given_after_calls_without_them_name_the_rows_in_order() -> None:
    aggregator = GABA(warmup_steps=0)
    for step in range(2):
        aggregator(torch.stack([_task_row(name, step) for name in ("a", "b", "c")]))
    _named_call(Method("GABA", GABA), aggregator, ("a", "b", "c"), 2)  # names the rows
    _named_call(Method("GABA", GABA), aggregator, ("c", "a"), 3)
    assert aggregator.known_tasks == ("a", "b", "c")
    assert int(aggregator.gramian_weighting.step_count) == 4


def test_names_with_another_task_count_than_unnamed_state_reset_it_with_a_warning() -> None:
    aggregator = GABA()
    aggregator(torch.randn(3, 5))
    aggregator.tasks = ["a", "b"]
    with pytest.warns(UserWarning, match="received 2 tasks after 3 tasks: its state was reset"):
        aggregator(torch.randn(2, 5))
    assert aggregator.known_tasks == ("a", "b")


def test_names_of_every_checkpointable_kind_round_trip() -> None:
    names: list[Hashable] = ["loss/a", 7, ("dataset", 3)]
    aggregator = GABA()
    aggregator.tasks = names
    aggregator(torch.randn(3, 5))
    buffer = io.BytesIO()
    torch.save(aggregator.state_dict(), buffer)
    buffer.seek(0)
    resumed = GABA()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.known_tasks == tuple(names)
    assert all(isinstance(v, Tensor) for v in resumed.state_dict().values())


def _first_named_aggregators() -> list[Method]:
    """The first registry entry of each aggregator class that takes task names."""

    first: dict[object, Method] = {}
    for method in STATEFUL:
        if method.is_aggregator and hasattr(method.factory, "tasks"):
            first.setdefault(method.factory, method)
    return list(first.values())


# Fresh state built under the names, the same names (no new graph), a new order, a new task, an
# absent one, and back.
COMPILED_SCHEDULE = (("a", "b", "c"), ("a", "b", "c"), ("a", "b", "c"), ("c", "a", "b"))
COMPILED_SCHEDULE += (("a", "d", "b", "c"), ("b", "d"), ("a", "b", "c"))


@pytest.mark.parametrize("method", _first_named_aggregators(), ids=str)
def test_named_tasks_trace_without_a_graph_break(method: Method) -> None:
    """
    The names are Python state: torch.compile(fullgraph=True) traces every call. Names equal to
    the known ones reuse the graph; new names, a new order or absent tasks retrace (a new graph,
    guarded on the names), and give the eager numbers and state.
    """

    eager, traced = method.make(), method.make()
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(traced, backend=counter, fullgraph=True)
    graphs = []
    for step, names in enumerate(COMPILED_SCHEDULE):
        stat = method.input_of(torch.stack([_task_row(name, step) for name in names]))
        eager.tasks = traced.tasks = list(names)  # type: ignore[assignment]
        expected = method.step(eager, stat)
        assert_equal_up_to_rounding(method.step(traced, stat, compiled), expected, m=len(names))
        graphs.append(counter.frame_count)
    assert graphs[2] == graphs[1]  # the same names: no new graph
    assert_same_state_up_to_rounding(traced, eager, m=len(NAMES))
    assert traced.known_tasks == eager.known_tasks == ("a", "b", "c", "d")  # type: ignore[union-attr]
