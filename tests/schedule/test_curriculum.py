from __future__ import annotations

import copy
import io
import logging
from typing import Any

import pytest
import torch
from golden_pendulum import golden_nash_backward
from torch import Tensor, nn
from torch.testing import assert_close
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden import (
    AdaptiveGoldenPendulum,
    Curriculum,
    DynamicK,
    GoldenPendulum,
    Phase,
    TaskGroup,
    get_preset,
)

from .._asserts import MatrixProducts, relative_error
from .._knife_edge import (
    golden_qp_branches,
    golden_reference_step,
    reference_step_size,
    task_jacobian,
    tight_tolerance,
)

TASKS = ("a", "b", "c", "d")


class Net(nn.Module):
    def __init__(self, neck: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        # A neck shared by the heads keeps the tasks' gradients overlapping when the backbone is
        # frozen: disjoint gradients make the golden targets a fixed point of the QP, where the
        # sign of alpha - target is rounding noise that differs between CPU kernels. (Given the
        # backbone's output as the shared features, mtl_backward needs heads without one.)
        self.neck = nn.Sequential(nn.Linear(8, 8), nn.Tanh()) if neck else nn.Identity()
        self.heads = nn.ModuleDict({name: nn.Linear(8, 1) for name in TASKS})
        self.double()  # float32 QPs may differ in the sign of alpha - target, where it is ~0

    def losses(self, inputs: Tensor, features: Tensor | None = None) -> dict[str, Tensor]:
        features = self.neck(self.backbone(inputs) if features is None else features)
        scales = dict(zip(TASKS, (100.0, 1.0, 0.3, 5.0), strict=True))
        return {
            name: scales[name] * (head(features)[:, 0] - inputs[:, k]).pow(2).mean()
            for k, (name, head) in enumerate(self.heads.items())
        }


def phases(events: list[str] | None = None) -> list[Phase]:
    log = [] if events is None else events

    def enter(model: Any, phase: Phase) -> None:
        log.append(f"enter {phase.name} {model is not None}")

    def leave(model: Any, phase: Phase) -> None:
        log.append(f"exit {phase.name}")

    return [
        Phase("joint", {"a", "b", "c"}, steps=3, lam=0.6, lr=0.02, warmup_steps=2,
              on_enter=enter, on_exit=leave),
        Phase("heads", ["c", "d"], steps=4, freeze_backbone=True, lam=0.2, lr=0.1, pcgrad=False,
              warmup_steps=4, on_enter=enter, on_exit=leave),
    ]  # fmt: skip


def batches(count: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 5, generator=generator, dtype=torch.float64) for _ in range(count)]


def test_phase_learning_rate_and_validation() -> None:
    phase = Phase("p", {"a"}, steps=10, lr=0.3, warmup_steps=3)
    assert [phase.learning_rate(s) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    for kwargs, match in [
        ({"steps": 0}, "steps"),
        ({"steps": 2, "lam": -1.0}, "lam"),
        ({"steps": 2, "warmup_steps": -1}, "warmup_steps"),
        ({"steps": 2, "freeze_backbone": 1}, "freeze_backbone"),
        ({"steps": 2, "on_enter": "no"}, "on_enter"),
    ]:
        with pytest.raises(ValueError, match=match):
            Phase("p", {"a"}, **kwargs)
    with pytest.raises(ValueError, match="tasks"):
        Phase("p", "abc", steps=1)


def test_a_run_sets_lr_freezing_lambda_tasks_and_calls_back() -> None:
    model, events = Net(), []
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    aggregator = DynamicK([TaskGroup("g", ["a", "b"])])
    curriculum = Curriculum(
        phases(events), aggregator, model=model, backbone=model.backbone, optimizer=optimizer
    )
    seen = []
    for inputs in batches(curriculum.total_steps):
        weights = curriculum.backward(model.losses(inputs))
        seen.append(
            (
                curriculum.current_phase_name,
                round(optimizer.param_groups[0]["lr"], 12),
                model.backbone[0].weight.requires_grad,
                aggregator.lam,
                aggregator.pcgrad,
                aggregator.tasks,
                tuple(weights),
            )
        )
        optimizer.step()
        optimizer.zero_grad()
        curriculum.step()
    assert seen == [
        ("joint", 0.01, True, 0.6, True, ("a", "b", "c"), ("a", "b", "c")),
        ("joint", 0.02, True, 0.6, True, ("a", "b", "c"), ("a", "b", "c")),
        ("joint", 0.02, True, 0.6, True, ("a", "b", "c"), ("a", "b", "c")),
        ("heads", 0.025, False, 0.2, False, ("c", "d"), ("c", "d")),
        ("heads", 0.05, False, 0.2, False, ("c", "d"), ("c", "d")),
        ("heads", 0.075, False, 0.2, False, ("c", "d"), ("c", "d")),
        ("heads", 0.1, False, 0.2, False, ("c", "d"), ("c", "d")),
    ]
    assert events == ["enter joint True", "exit joint", "enter heads True", "exit heads"]
    assert curriculum.is_complete
    assert curriculum.global_step == 7
    with pytest.raises(RuntimeError, match="complete"):
        curriculum.backward(model.losses(batches(1)[0]))


def test_gradients_are_torchjd_with_the_phase_settings() -> None:
    """
    backward: the phase's losses through backward and jac_to_grad give golden_nash_backward's
    gradients, step by step from the same parameters (neither model takes a step, so no step's
    result moves the next one's inputs).

    In phase "heads" the frozen backbone leaves two heads that share no parameter: their
    normalised Gramian is the identity, each alpha_k sits on its target up to rounding, and the
    reference's QP follows the sign of that rounding (tests/_knife_edge.py), so that the reference
    itself gives gradients up to ~1 % apart on two CPUs. Those steps are found as such (and only
    they), and there the gradients must equal one of the reference's branches, one of the results
    it gives when each sign read within rounding takes each value; elsewhere they must equal the
    reference's. Both to 16 m units of float64 rounding.
    """

    model = Net(neck=False)  # the frozen backbone leaves the heads disjoint: knife edges
    reference_model = copy.deepcopy(model)
    curriculum = Curriculum(phases(), model=model, backbone=model.backbone)
    knife_edges = []
    for step, inputs in enumerate(batches(5)):
        phase = curriculum.current_phase
        curriculum.backward(model.losses(inputs))
        all_losses = reference_model.losses(inputs)
        losses = {name: loss for name, loss in all_losses.items() if name in phase.tasks}
        if step == 3:  # entering phase "heads" froze the backbone: mirror it
            reference_model.backbone.requires_grad_(False)
        trained = [p for p in reference_model.parameters() if p.requires_grad]
        expected = golden_reference_step(
            task_jacobian(losses, trained), lam=phase.lam, pcgrad=phase.pcgrad
        )
        golden_nash_backward(losses, reference_model, lam=phase.lam, pcgrad=phase.pcgrad)
        tolerance = tight_tolerance(len(losses), torch.float64)
        theirs = torch.cat([p.grad.flatten() for p in trained if p.grad is not None])
        assert relative_error(theirs, expected.expected(theirs).gradient) <= tolerance

        pairs = list(zip(model.parameters(), reference_model.parameters(), strict=True))
        assert all((mine.grad is None) == (p.grad is None) for mine, p in pairs)
        mine = [p.grad for p in model.parameters() if p.grad is not None]
        branch = expected.expected(torch.cat([grad.flatten() for grad in mine])).gradient
        for grad, part in zip(mine, branch.split([grad.numel() for grad in mine]), strict=True):
            assert relative_error(grad, part.view_as(grad)) <= tolerance
        if expected.on_knife_edge:
            knife_edges.append(step)
        model.zero_grad()
        reference_model.zero_grad()
        curriculum.step()
    assert knife_edges == [3, 4]


def test_on_the_knife_edge_a_wrong_qp_is_still_rejected() -> None:
    """
    At a step of phase "heads" (the identity Gramian above), the reference's branches are
    hundreds of results within ~1 % of each other, yet a QP with a wrong step size, lambda, sign
    or number of steps, which takes a branch of its own, lands on none of them: the comparison at
    a knife edge can still fail.
    """

    model = Net(neck=False)
    model.backbone.requires_grad_(False)
    heads = [p for p in model.parameters() if p.requires_grad]
    losses = {k: v for k, v in model.losses(batches(1)[0]).items() if k in ("c", "d")}
    jacobian = task_jacobian(losses, heads)
    expected = golden_reference_step(jacobian, lam=0.2, pcgrad=False)
    assert expected.on_knife_edge
    assert len(expected.branches) > 100
    tolerance = tight_tolerance(2, torch.float64)
    # The reference's own results on inputs a few units in the last place apart are branches.
    assert expected.nudged
    for outcome in expected.nudged:
        assert relative_error(outcome.gradient, expected.expected(outcome.gradient).gradient) <= (
            tolerance
        )

    def off_the_branches(gradient: Tensor) -> float:
        return relative_error(gradient, expected.expected(gradient).gradient) / tolerance

    assert off_the_branches(GoldenPendulum(lam=0.2, pcgrad=False)(jacobian)) <= 1.0
    for wrong in (
        GoldenPendulum(lam=0.25, pcgrad=False),
        GoldenPendulum(lam=0.2, n_iter=24, pcgrad=False),
    ):
        assert off_the_branches(wrong(jacobian)) > 1e3
    rows = jacobian / jacobian.norm(dim=1, keepdim=True)
    for lam, step_size in [
        (0.2, lambda t: 0.05 / (1.0 + t)),  # a wrong schedule
        (0.2, lambda t: 0.05 / (1.0 + 0.11 * t)),  # a slightly wrong one
        (-0.2, reference_step_size),  # the pull the wrong way
        (0.21, reference_step_size),  # a lambda 5 % off
    ]:
        (alpha,), _ = golden_qp_branches(rows @ rows.T, lam, step_size=step_size)
        assert off_the_branches(alpha @ rows) > 1e3, (lam, step_size)


def test_with_features_it_is_mtl_backward() -> None:
    model = Net(neck=False)
    twin = copy.deepcopy(model)
    curriculum = Curriculum(phases(), model=model, backbone=model.backbone)
    for inputs in batches(5):
        phase = curriculum.current_phase
        features = model.backbone(inputs)
        curriculum.backward(model.losses(inputs, features), features=features)

        twin_features = twin.backbone(inputs)
        losses = [
            loss for name, loss in twin.losses(inputs, twin_features).items() if name in phase.tasks
        ]
        if phase.freeze_backbone:  # nothing shared: each head its own gradient
            twin.backbone.requires_grad_(False)
            torch.autograd.backward(torch.stack(losses).sum())
        else:
            mtl_backward(losses, features=twin_features)
            jac_to_grad(list(twin.backbone.parameters()), GoldenPendulum(lam=phase.lam))
        for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
            if theirs.grad is None:
                assert mine.grad is None
            else:
                assert_close(mine.grad, theirs.grad)
        model.zero_grad()
        twin.zero_grad()
        curriculum.step()


def test_missing_tasks_give_no_gradient(caplog: pytest.LogCaptureFixture) -> None:
    """With every task named, a batch with none of the phase's tasks trains nothing."""

    model = Net()
    curriculum = Curriculum(phases(), model=model, tasks=TASKS)
    losses = model.losses(batches(1)[0])
    with caplog.at_level(logging.WARNING):
        assert curriculum.backward({"d": losses["d"]}) == {}
    assert "no gradient" in caplog.text
    assert all(p.grad is None for p in model.parameters())


def test_a_phase_task_that_no_loss_carries_raises_with_the_names() -> None:
    """ "vol" for "volatility": without `tasks`, every phase task must have a loss."""

    model = Net()
    typo = [Phase("joint", {"a", "b", "vol"}, steps=2)]
    curriculum = Curriculum(typo, model=model)
    losses = model.losses(batches(1)[0])
    expected = (
        r"Phase 'joint' trains \['a', 'b', 'vol'\], but no loss carries \['vol'\]: the losses "
        r"are of \['a', 'b', 'c', 'd'\]\..*`Curriculum\(\.\.\., tasks=\.\.\.\)`"
    )
    with pytest.raises(ValueError, match=expected):
        curriculum.backward(losses)
    assert all(p.grad is None for p in model.parameters())
    # A batch without one of the phase's tasks raises too, unless the tasks are named.
    curriculum = Curriculum(phases(), model=model)
    with pytest.raises(ValueError, match=r"no loss carries \['b'\]"):
        curriculum.backward({"a": losses["a"], "c": losses["c"]})


def test_named_tasks_check_the_phases_and_let_a_batch_lack_some() -> None:
    with pytest.raises(ValueError, match=r"Phase 'joint' trains \['vol'\], which is not among"):
        Curriculum([Phase("joint", {"a", "vol"}, steps=2)], tasks=TASKS)
    with pytest.raises(ValueError, match="`tasks` must be a collection of task names"):
        Curriculum(phases(), tasks="abcd")

    model = Net()
    reference_model = copy.deepcopy(model)
    curriculum = Curriculum(phases(), model=model, tasks=TASKS)
    inputs = batches(1)[0]
    losses = model.losses(inputs)
    with pytest.raises(ValueError, match=r"The losses carry \['volatility'\], which is not among"):
        curriculum.backward({"a": losses["a"], "volatility": losses["b"]})

    # Phase "joint" trains a, b and c: this batch lacks b, so a and c are balanced.
    weights = curriculum.backward({name: losses[name] for name in ("a", "c", "d")})
    assert list(weights) == ["a", "c"]
    theirs = reference_model.losses(inputs)
    golden_nash_backward({"a": theirs["a"], "c": theirs["c"]}, reference_model, lam=0.6)
    for mine, other in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert (mine.grad is None) == (other.grad is None)
        if mine.grad is not None:
            assert relative_error(mine.grad, other.grad) < 1e-10


def test_losses_must_be_named() -> None:
    model = Net()
    curriculum = Curriculum(phases(), model=model)
    losses = list(model.losses(batches(1)[0]).values())
    with pytest.raises(TypeError, match=r"`losses` must be a mapping from task name to loss.*list"):
        curriculum.backward(losses)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "other",
    [
        [Phase("joint", {"a", "b", "c"}, steps=3), Phase("tails", ["c", "d"], steps=4)],
        [Phase("joint", {"a", "b", "c"}, steps=3), Phase("heads", ["c", "d"], steps=40)],
        [Phase("joint", {"a", "b", "c"}, steps=3)],
    ],
    ids=["a phase's name", "a phase's steps", "a phase fewer"],
)
def test_a_checkpoint_of_other_phases_is_refused(other: list[Phase]) -> None:
    model = Net()
    curriculum = Curriculum(phases(), model=model)
    for inputs in batches(4):
        curriculum.backward(model.losses(inputs))
        curriculum.step()
    buffer = io.BytesIO()
    torch.save(curriculum.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    elsewhere = Curriculum(other, model=model)
    with pytest.raises(ValueError, match=r"checkpoint is of a curriculum with other phases.*"
                       r"\[\('joint', 3\), \('heads', 4\)\]"):  # fmt: skip
        elsewhere.load_state_dict(state)
    assert (elsewhere.global_step, elsewhere.current_phase_name) == (0, "joint")
    unnamed = {key: value for key, value in state.items() if key != "phases"}
    with pytest.raises(ValueError, match="none saved"):
        Curriculum(phases(), model=model).load_state_dict(unnamed)
    same = Curriculum(phases(), model=model)
    same.load_state_dict(state)  # same names and steps; callbacks and settings may differ
    assert (same.global_step, same.current_phase_name, same.phase_step) == (4, "heads", 1)


def test_a_run_resumed_from_a_checkpoint_continues_identically() -> None:
    """
    Position, freezing, learning rate and the aggregator's state (groups found by gradient
    similarity, named) come back, mid-phase, and the resumed run's steps make the same matrix
    products as the uninterrupted run's (same kernels, shapes, strides and alignment), so that
    its gradients are the same bits on any CPU, not only on one whose kernels happen to round two
    ways of computing them alike. (Loading enters the phase at once: a first forward pass through
    a backbone frozen only in backward would compute the heads' gradients by other products.)
    """

    def run(stop: int | None) -> list[Any]:
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        make = lambda: Curriculum(  # noqa: E731
            phases(),
            DynamicK(auto_group=True, regroup_every=2, similarity_threshold=0.0),
            model=model,
            backbone=model.backbone,
            optimizer=optimizer,
        )
        curriculum = make()
        records: list[Any] = []
        for step, inputs in enumerate(batches(7)):
            if step == stop:
                buffer = io.BytesIO()
                torch.save(
                    {"curriculum": curriculum.state_dict(), "optimizer": optimizer.state_dict()},
                    buffer,
                )
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                model.backbone.requires_grad_(True)  # a new process: nothing is frozen yet
                curriculum = make()
                curriculum.load_state_dict(saved["curriculum"])
                optimizer.load_state_dict(saved["optimizer"])
            with MatrixProducts() as products:
                weights = curriculum.backward(model.losses(inputs))
            records.append(
                (
                    optimizer.param_groups[0]["lr"],
                    [p.requires_grad for p in model.parameters()],
                    {k: float(w) for k, w in weights.items()},
                    [None if p.grad is None else p.grad.clone() for p in model.parameters()],
                    (curriculum.aggregator.groups, products.calls),
                )
            )
            optimizer.step()
            optimizer.zero_grad()
            curriculum.step()
        return records

    uninterrupted = run(None)
    for stop in (2, 5):
        resumed = run(stop)
        for (lr, flags, weights, grads, groups), expected in zip(
            resumed, uninterrupted, strict=True
        ):
            assert (lr, flags, weights, groups) == (*expected[:3], expected[4])
            for grad, other in zip(grads, expected[3], strict=True):
                assert (grad is None and other is None) or torch.equal(grad, other)


def test_from_preset_and_the_aggregator_default() -> None:
    curriculum = Curriculum.from_preset("finance_quick")
    assert [p.name for p in curriculum.phases] == ["A_combined", "B_meta"]
    assert curriculum.phases == get_preset("finance_quick").phases
    assert isinstance(curriculum.aggregator, GoldenPendulum)
    assert curriculum.total_steps == 13000
    assert curriculum.current_lr == pytest.approx(5e-5 / 300)
    assert (
        repr(curriculum)
        == "Curriculum(phases=['A_combined', 'B_meta'], aggregator=GoldenPendulum(lam=0.5, "
        "n_iter=25, min_weight_fraction=0.02, pcgrad=True))"
    )


def test_backbone_as_parameters_or_function() -> None:
    model = Net()
    for backbone in (list(model.backbone.parameters()), lambda m: m.backbone.parameters()):
        curriculum = Curriculum(phases()[1:], model=model, backbone=backbone)
        curriculum.enter_phase()
        assert not model.backbone[0].weight.requires_grad
        model.backbone.requires_grad_(True)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="phases"):
        Curriculum([])
    with pytest.raises(ValueError, match="Phase"):
        Curriculum(["joint"])  # type: ignore[list-item]
    curriculum = Curriculum(phases())
    with pytest.raises(ValueError, match="model"):
        curriculum.backward({k: torch.tensor(1.0, requires_grad=True) for k in ("a", "b", "c")})


def test_a_backward_refused_for_want_of_a_model_does_not_enter_the_phase() -> None:
    """The phase is entered by the first backward that has the model, so its backbone freezes."""

    model = Net()
    curriculum = Curriculum(phases()[1:], backbone=lambda m: m.backbone.parameters())
    losses = model.losses(batches(1)[0])
    with pytest.raises(ValueError, match="model"):
        curriculum.backward({k: v for k, v in losses.items() if k in ("c", "d")})
    curriculum.model = model
    curriculum.backward({k: v for k, v in model.losses(batches(1)[0]).items() if k in ("c", "d")})
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_a_stateful_aggregator_keeps_its_state_across_phases() -> None:
    """With task names, lambda carries over from a phase of 3 tasks to one of 2: no reset."""

    model = Net()
    aggregator = AdaptiveGoldenPendulum(sensitivity=5.0)
    curriculum = Curriculum(phases(), aggregator, model=model, backbone=model.backbone)
    lams = []
    for inputs in batches(5):
        curriculum.backward(model.losses(inputs))
        lams.append(float(aggregator.current_lam))
        curriculum.step()
    assert lams[3] != aggregator.lam_init  # not restarted on entering phase "heads"
    assert int(aggregator.gramian_weighting.step_count) == 5
