from __future__ import annotations

import io
from importlib.metadata import entry_points
from typing import Any

import pytest
import torch
from golden_pendulum.pro import DynamicK as ReferenceDynamicK
from golden_pendulum.pro import TaskGroup as ReferenceTaskGroup
from torch import Tensor, nn
from torch.testing import assert_close
from torchjd.autogram import Engine
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import (
    DynamicK,
    DynamicKWeighting,
    GoldenPendulum,
    GoldenPendulumWeighting,
    TaskGroup,
    aggregator_from_config,
    golden_ratio_weights,
)
from torchjd_golden.aggregation._kernels import solver_path

from .._asserts import relative_error
from .._inputs import conflicting_jacobian
from .._knife_edge import tight_tolerance

NAMES = ("returns", "rank", "quality", "vol", "mae", "regime")
GROUPS = [TaskGroup("ranking", ["returns", "rank", "quality"]), TaskGroup("risk", ["vol"], lam=0.2)]


def named(aggregator: Any, names: tuple[str, ...] = NAMES) -> Any:
    aggregator.tasks = names
    return aggregator


def reference_gradient(jacobian: Tensor, names: tuple[str, ...], **settings: Any) -> Tensor:
    """What ``golden_pendulum.pro.DynamicK.backward`` writes for these rows."""

    parameter = nn.Parameter(torch.zeros(jacobian.shape[1], dtype=jacobian.dtype))
    model = nn.Module()
    model.parameter = parameter
    ReferenceDynamicK(**settings).backward(
        {name: row @ parameter for name, row in zip(names, jacobian, strict=True)}, model
    )
    assert parameter.grad is not None
    return parameter.grad


@pytest.mark.parametrize("m", [2, 3, 6, 9])
def test_without_groups_it_is_golden_pendulum(m: int) -> None:
    """One catch-all group of every task in row order: exactly Golden Pendulum."""

    jacobian = conflicting_jacobian(m, 30, seed=m)
    assert torch.equal(DynamicK()(jacobian), GoldenPendulum()(jacobian))
    gramian = jacobian @ jacobian.T
    assert torch.equal(
        DynamicKWeighting(pcgrad=False)(gramian), GoldenPendulumWeighting(pcgrad=False)(gramian)
    )


def test_weights_within_groups_by_hand() -> None:
    """w_k = beta_p w^(p)_k with Golden Pendulum on the group's block, beta_p / ||J_k|| alone."""

    jacobian = conflicting_jacobian(6, 40, seed=1)
    gramian = jacobian @ jacobian.T
    weighting = named(DynamicKWeighting(GROUPS, lam=0.7))
    weights = weighting(gramian)

    beta = golden_ratio_weights(3, dtype=torch.float64)
    ranking = [0, 1, 2]
    expected = torch.zeros(6, dtype=torch.float64)
    expected[ranking] = beta[0] * GoldenPendulumWeighting(lam=0.7)(gramian[ranking][:, ranking])
    expected[3] = beta[1] / jacobian[3].norm()
    rest = [4, 5]  # the catch-all group, sorted by name: "mae" < "regime"
    expected[rest] = beta[2] * GoldenPendulumWeighting(lam=0.7)(gramian[rest][:, rest])
    assert_close(weights, expected, rtol=1e-12, atol=0.0)
    assert [g.name for g in weighting.active_groups] == ["ranking", "risk", "_ungrouped"]
    assert weighting.active_groups[2].tasks == ("mae", "regime")
    assert_close(weighting.alpha.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert weighting.group_weights == dict(
        zip(["ranking", "risk", "_ungrouped"], beta.tolist(), strict=True)
    )


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "groups": [
                ReferenceTaskGroup("a", {"rank", "vol"}),
                ReferenceTaskGroup("b", {"mae"}, lam=2.0),
            ]
        },
        {
            "groups": [ReferenceTaskGroup("a", {"returns", "quality", "vol"}, lam=0.1)],
            "pcgrad": False,
        },
        {"auto_group": True, "similarity_threshold": 0.0, "lam": 0.3},
        {"auto_group": True, "similarity_threshold": -0.2, "n_iter": 5},
    ],
    ids=["no-groups", "two-groups", "no-pcgrad", "auto", "auto-loose"],
)
def test_pcgrad_across_groups_is_the_reference(settings: dict[str, Any]) -> None:
    jacobian = conflicting_jacobian(6, 40, seed=11, decades=2.5)
    native = dict(settings)
    native["groups"] = [TaskGroup(g.name, g.tasks, g.lam) for g in settings.get("groups", [])]
    aggregator = named(DynamicK(**native, pcgrad_across_groups=True))
    expected = reference_gradient(jacobian, NAMES, **settings)
    assert relative_error(aggregator(jacobian), expected) <= tight_tolerance(6, torch.float64)


def test_the_aggregator_computes_only_the_blocks_it_reads() -> None:
    jacobian = conflicting_jacobian(6, 40, seed=2)
    aggregator = named(DynamicK(GROUPS))
    seen = []
    aggregator.gramian_weighting.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    output = aggregator(jacobian)

    (gramian,) = seen
    full = jacobian @ jacobian.T
    blocks = torch.zeros(6, 6, dtype=torch.bool)
    for rows in ([0, 1, 2], [3], [4, 5]):
        blocks[torch.tensor(rows).unsqueeze(1), torch.tensor(rows)] = True
    assert torch.equal(gramian[~blocks], torch.zeros(int((~blocks).sum()), dtype=torch.float64))
    assert_close(gramian[blocks], full[blocks])
    # The weighting reads nothing else: the full Gramian gives the same weights.
    assert_close(output, named(DynamicKWeighting(GROUPS))(full) @ jacobian)


@pytest.mark.parametrize(
    "layout",
    [
        [[0, 1], [2, 3], [4, 5], [6], [7, 8, 9]],  # a run of equal consecutive blocks first
        [[0], [1], [2], [3, 4, 5], [6, 7, 8], [9]],
        [[1, 3], [0, 2], [4, 5, 6, 7, 8, 9]],  # rows out of order
        [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]],
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_the_blocks_equal_those_of_the_gramian(layout: list[list[int]], dtype: torch.dtype) -> None:
    jacobian = conflicting_jacobian(10, 50, seed=7, decades=1.0).to(dtype)
    groups = [TaskGroup(f"g{k}", rows) for k, rows in enumerate(layout)]
    seen = []
    aggregator = DynamicK(groups)
    aggregator.gramian_weighting.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    aggregator(jacobian)
    full = jacobian.double() @ jacobian.double().T
    mask = torch.zeros(10, 10, dtype=torch.bool)
    for rows in layout:
        mask[torch.tensor(rows).unsqueeze(1), torch.tensor(rows)] = True
    (gramian,) = seen
    assert gramian.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert_close(gramian.double(), torch.where(mask, full, 0.0), rtol=1e-6, atol=1e-6)


def test_regrouping_calls_and_reference_mode_read_the_full_gramian() -> None:
    jacobian = conflicting_jacobian(4, 20, seed=3)
    automatic = DynamicKWeighting(auto_group=True, regroup_every=2)
    assert automatic.gramian_blocks(4) is None  # the first call regroups
    automatic(jacobian @ jacobian.T)
    assert automatic.gramian_blocks(4) is not None
    automatic(jacobian @ jacobian.T)
    assert automatic.gramian_blocks(4) is None
    assert DynamicKWeighting(GROUPS, pcgrad_across_groups=True).gramian_blocks(6) is None


def test_order_free_by_names() -> None:
    """Permuting the rows and their names permutes nothing in the aggregation."""

    jacobian = conflicting_jacobian(6, 30, seed=4)
    expected = named(DynamicK(GROUPS))(jacobian)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        permutation = torch.randperm(6, generator=generator).tolist()
        names = tuple(NAMES[k] for k in permutation)
        assert_close(named(DynamicK(GROUPS), names)(jacobian[permutation]), expected)


def test_a_task_in_two_groups_is_refused() -> None:
    """Given together, set, or by add_task: a task belongs to one group at most."""

    match = "task 'b' is in groups 'x' and 'y'"
    overlapping = [TaskGroup("x", ["a", "b"]), TaskGroup("y", ["b", "c"])]
    with pytest.raises(ValueError, match=match):
        DynamicK(overlapping)
    aggregator = DynamicK()
    with pytest.raises(ValueError, match=match):
        aggregator.groups = overlapping
    aggregator.groups = overlapping[:1]
    with pytest.raises(ValueError, match=match):
        aggregator.add_task("b", "y")
    aggregator.add_task("b", "x")  # already there: nothing changes
    assert aggregator.groups == (TaskGroup("x", ["a", "b"]),)
    aggregator.remove_task("b")
    aggregator.add_task("b", "y")  # moved
    assert aggregator.groups == (TaskGroup("x", ["a"]), TaskGroup("y", ["b"]))


def test_add_and_remove_tasks() -> None:
    weighting = DynamicKWeighting(GROUPS)
    weighting.add_task("regime", "risk")
    weighting.add_task("embedding", "meta")
    weighting.remove_task("rank")
    assert [(g.name, g.tasks, g.lam) for g in weighting.groups] == [
        ("ranking", ("returns", "quality"), None),
        ("risk", ("vol", "regime"), 0.2),
        ("meta", ("embedding",), None),
    ]
    jacobian = conflicting_jacobian(6, 30, seed=6)
    named(weighting)(jacobian @ jacobian.T)
    assert [(g.name, g.tasks) for g in weighting.active_groups] == [
        ("ranking", ("returns", "quality")),
        ("risk", ("vol", "regime")),
        ("_ungrouped", ("mae", "rank")),
    ]
    weighting.reset()
    assert weighting.groups == tuple(GROUPS)


def test_automatic_groups_follow_the_cosines() -> None:
    """Rows along two opposite directions form two groups, found again every regroup_every calls."""

    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(30, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(5, 30, generator=generator, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64).unsqueeze(1)
    jacobian = signs * direction + noise
    weighting = named(DynamicKWeighting(auto_group=True, regroup_every=3), tuple("edcba"))
    weighting(jacobian @ jacobian.T)
    assert [(g.name, g.tasks) for g in weighting.groups] == [
        ("auto_group_0", ("a", "c", "e")),
        ("auto_group_1", ("b", "d")),
    ]
    weighting.tasks = tuple("vwxyz")
    weighting(jacobian @ jacobian.T)  # no regrouping: every task is in the catch-all group
    assert [g.name for g in weighting.active_groups] == ["_ungrouped"]
    weighting(jacobian @ jacobian.T)
    weighting(jacobian @ jacobian.T)  # the fourth call regroups
    assert weighting.groups[0].tasks == ("v", "x", "z")


def test_non_finite_gramian_gives_nan_and_does_not_regroup() -> None:
    weighting = DynamicKWeighting(GROUPS, auto_group=True)
    gramian = torch.eye(6, dtype=torch.float64)
    gramian[2, 2] = torch.inf
    assert named(weighting)(gramian).isnan().all()
    assert weighting.groups == tuple(GROUPS)


def _with_nan(gramian: Tensor) -> Tensor:
    bad = gramian.clone()
    bad[0, 0] = torch.nan
    return bad


def test_a_non_finite_step_neither_counts_nor_moves_the_regrouping_schedule() -> None:
    """
    regroup_every=3: the finite steps 0, 3 and 6 regroup wherever non-finite ones fall, and the
    run gives the outputs and groups of the run without them. Before: each bad step counted, so
    it regrouped one finite step early from then on.
    """

    gramians = [j @ j.T for j in (conflicting_jacobian(5, 20, seed=s) for s in range(7))]
    settings = {"auto_group": True, "regroup_every": 3, "similarity_threshold": 0.0}
    clean = named(DynamicKWeighting(**settings), NAMES[:5])
    expected = []
    for gramian in gramians:
        expected.append((clean.regroups_next_call(), clean(gramian), clean.groups))
    assert [regroups for regroups, _, _ in expected] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]

    dirty = named(DynamicKWeighting(**settings), NAMES[:5])
    calls = [0, 1, None, 2, None, 3, 4, 5, 6]  # None: a NaN step
    flags = []
    for index in calls:
        flags.append(dirty.regroups_next_call())
        if index is None:
            groups, alpha = dirty.groups, dirty.alpha.clone()
            assert dirty(_with_nan(gramians[0])).isnan().all()
            assert dirty.groups == groups
            assert torch.equal(dirty.alpha, alpha)
        else:
            assert torch.equal(dirty(gramians[index]), expected[index][1])
            assert dirty.groups == expected[index][2]
    # The bad step at count 3 would regroup: it does not, and the next finite step does.
    assert flags == [True, False, False, False, True, True, False, False, True]
    assert int(dirty.step_count) == 7


def _host_reads_per_call(
    monkeypatch: pytest.MonkeyPatch, aggregator: DynamicK, jacobians: list[Tensor]
) -> list[int]:
    """
    The reads of tensor values on the host in each call, on the tensor path (as on an
    accelerator, where each is a synchronisation).
    """

    reads = [0]

    def counting(method: Any) -> Any:
        def read(*args: Any, **kwargs: Any) -> Any:
            reads[0] += 1
            return method(*args, **kwargs)

        return read

    per_call = []
    with monkeypatch.context() as patch, solver_path("tensor"):
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(Tensor, name, counting(getattr(Tensor, name)))
        for jacobian in jacobians:
            reads[0] = 0
            aggregator(jacobian)
            per_call.append(reads[0])
    return per_call


def test_only_a_possible_regrouping_reads_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    regroup_every=4: a regrouping call copies the cosines (and, from the second on, reads the
    step count first); the other calls read nothing. After a non-finite step, which the host does
    not see, the count is read on the calls that could be due, until one is.
    """

    jacobians = [conflicting_jacobian(5, 20, seed=s) for s in range(9)]
    settings = {"auto_group": True, "regroup_every": 4}
    clean = named(DynamicK(**settings), NAMES[:5])
    assert _host_reads_per_call(monkeypatch, clean, jacobians) == [1, 0, 0, 0, 2, 0, 0, 0, 2]

    bad = jacobians[2].clone()
    bad[1, 3] = torch.inf
    dirty = named(DynamicK(**settings), NAMES[:5])
    with_bad_step = [*jacobians[:2], bad, *jacobians[3:]]
    assert _host_reads_per_call(monkeypatch, dirty, with_bad_step) == [1, 0, 0, 0, 1, 2, 0, 0, 0]

    manual = named(DynamicK(GROUPS))
    six_rows = [conflicting_jacobian(6, 20, seed=s) for s in range(5)]
    assert _host_reads_per_call(monkeypatch, manual, six_rows) == [0] * 5


def test_checkpoint_carries_groups_names_and_calls() -> None:
    jacobians = [conflicting_jacobian(6, 30, seed=s) for s in range(6)]
    settings = {"auto_group": True, "regroup_every": 4, "similarity_threshold": 0.0}
    uninterrupted = named(DynamicK(**settings))
    expected = [uninterrupted(j) for j in jacobians]

    first = named(DynamicK(**settings))
    for jacobian in jacobians[:3]:
        first(jacobian)
    first.add_task("new", "auto_group_0")
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = DynamicK(**settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.tasks == NAMES
    assert resumed.groups == first.groups
    assert resumed.gramian_weighting.step_count == 3
    resumed.remove_task("new")
    for jacobian, output in zip(jacobians[3:], expected[3:], strict=True):
        assert torch.equal(resumed(jacobian), output)


def test_a_checkpoint_of_plain_values_is_refused_with_a_message() -> None:
    """What DynamicK saved before its state moved to buffers: no count to resume from."""

    old = {"groups": [["g", ["a", "b"], None]], "tasks": ["a", "b"], "step_count": 7}
    with pytest.raises(ValueError, match="written before the state moved to buffers"):
        DynamicK().load_state_dict({"gramian_weighting._extra_state": old}, strict=False)


@pytest.mark.parametrize("optimize", [False, True])
def test_jac_to_grad_and_the_autogram_engine(optimize: bool) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))

    inputs, targets = torch.randn(16, 5), torch.randn(16, 4)
    names = ("a", "b", "c", "d")
    groups = [TaskGroup("g", ["a", "c"]), TaskGroup("h", ["d"])]

    autojac = make()
    losses = ((autojac(inputs) - targets) ** 2).mean(dim=0)
    backward(losses)
    jac_to_grad(
        list(autojac.parameters()),
        named(DynamicK(groups), names),
        optimize_gramian_computation=optimize,
    )

    engine_model = make()
    engine = Engine(engine_model, batch_dim=None)
    losses = ((engine_model(inputs) - targets) ** 2).mean(dim=0)
    weighting = named(DynamicKWeighting(groups), names)
    losses.backward(weighting(engine.compute_gramian(losses)))

    for mine, expected in zip(engine_model.parameters(), autojac.parameters(), strict=True):
        assert_close(mine.grad, expected.grad, rtol=1e-4, atol=1e-6)


def test_before_any_call_nothing_is_active() -> None:
    aggregator = DynamicK(GROUPS)
    assert (aggregator.active_groups, aggregator.group_weights) == ((), {})
    assert aggregator.alpha.numel() == 0


def test_one_task_gives_the_raw_gradient() -> None:
    jacobian = 1e3 * torch.randn(1, 10)
    assert torch.equal(DynamicK(GROUPS)(jacobian), jacobian[0])


def test_from_a_config() -> None:
    aggregator = aggregator_from_config(
        {
            "name": "dynamic_k",
            "groups": [{"name": "g", "tasks": ["a", "b"], "lam": 0.1}],
            "lam": 0.4,
        }
    )
    assert isinstance(aggregator, DynamicK)
    assert aggregator.groups == (TaskGroup("g", ["a", "b"], lam=0.1),)
    assert repr(aggregator).startswith(
        "DynamicK(groups=[TaskGroup(name='g', tasks=('a', 'b'), lam=0.1)]"
    )
    assert str(aggregator) == "DynamicK"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TaskGroup("", ["a"]), "name"),
        (lambda: TaskGroup("g", ["a", "a"]), "distinct"),
        (lambda: TaskGroup("g", [["unhashable"]]), "hashable"),
        (lambda: TaskGroup("g", ["a"], lam=-1.0), "lam"),
        (
            lambda: TaskGroup("g", "depth"),
            "not the string 'depth'.*TaskGroup\\('g', \\['depth'\\]\\)",
        ),
        (lambda: TaskGroup("g", [1.5]), "strings or integers"),
        (lambda: DynamicK([TaskGroup("_ungrouped", ["a"])]), "named '_ungrouped'"),
        (lambda: DynamicK().add_task("a", "_ungrouped"), "named '_ungrouped'"),
        (lambda: DynamicK([TaskGroup("g"), TaskGroup("g")]), "distinct"),
        (lambda: DynamicK(TaskGroup("g")), "sequence of task groups"),
        (lambda: DynamicK(["g"]), "TaskGroup or a mapping"),
        (lambda: DynamicK(regroup_every=0), "regroup_every"),
        (lambda: DynamicK(similarity_threshold=2.0), "similarity_threshold"),
        (lambda: DynamicK(pcgrad_across_groups=1), "pcgrad_across_groups"),
        (lambda: setattr(DynamicK(), "tasks", "abc"), "tasks"),
        (lambda: setattr(DynamicK(), "tasks", ["a", "a"]), "distinct"),
    ],
)
def test_bad_input_is_named(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_task_names_must_match_the_rows() -> None:
    aggregator = named(DynamicK(), ("a", "b"))
    with pytest.raises(ValueError, match="2 task names"):
        aggregator(torch.randn(3, 4))


def test_set_of_unsortable_names_is_ordered_by_repr() -> None:
    assert TaskGroup("g", {"b", 1, "a"}).tasks == ("a", "b", 1)  # "'" < "1"
    assert TaskGroup("g", {"b", "a"}).tasks == ("a", "b")
    assert TaskGroup("g", ["b", "a"]).tasks == ("b", "a")


def test_registered_as_entry_points() -> None:
    points = {point.name: point for point in entry_points(group="torchjd_golden")}
    assert points["DynamicK"].load() is DynamicK
    assert points["DynamicKWeighting"].load() is DynamicKWeighting


def test_compiled_matches_eager() -> None:
    """
    Without regrouping a call traces with fullgraph=True, with task names, for more calls than
    the recompilation limit: no host synchronisation, and no Python number that changes.
    """

    eager, traced = named(DynamicKWeighting(GROUPS)), named(DynamicKWeighting(GROUPS))
    torch._dynamo.reset()
    compiled = torch.compile(traced, backend="eager", fullgraph=True)
    calls = torch._dynamo.config.recompile_limit + 2
    for seed in range(calls):
        jacobian = conflicting_jacobian(6, 20, seed=seed)
        assert_close(compiled(jacobian @ jacobian.T), eager(jacobian @ jacobian.T))
    assert int(traced.step_count) == int(eager.step_count) == calls
