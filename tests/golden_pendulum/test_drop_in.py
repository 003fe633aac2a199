"""
``torchjd_golden.golden_pendulum`` against ``golden_pendulum`` (golden-pendulum-mtl 0.2.0): the
same scripts, run through both imports on a float64 model with six named tasks whose losses span
300x, give the same returned values and parameter gradients (to 16 m units of float64 rounding a
step; every QP of the reference clear of a knife edge, see ``tests/golden_pendulum/_drop_in.py``).

``python -m pytest tests/golden_pendulum/test_drop_in.py -q -s`` prints the worst relative
difference per class.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import golden_pendulum as reference
import golden_pendulum.pro as reference_pro
import pytest
import torch

import torchjd_golden.golden_pendulum as ours
import torchjd_golden.golden_pendulum.pro as ours_pro

from ._drop_in import TASKS, Workload, assert_same_records, run

WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_worst_differences() -> Iterator[None]:
    yield
    print("\nWorst relative difference against golden-pendulum-mtl 0.2.0:")
    for label, error in sorted(WORST.items()):
        print(f"  {label:28s} {error:.2e}")


MODULES = [
    "",
    ".core",
    ".callbacks",
    ".pro",
    ".pro.adaptive",
    ".pro.curriculum",
    ".pro.diagnostics",
    ".pro.dynamic_k",
    ".pro.presets",
]


def _public_api(module: ModuleType) -> dict[str, Any]:
    """The names of ``module``'s ``__all__``, or the classes, functions and constants it defines."""

    if hasattr(module, "__all__"):
        return {name: getattr(module, name) for name in module.__all__}
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    } | ({"PHI": module.PHI} if module.__name__ == "golden_pendulum.core" else {})


def _parameters(value: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(value).parameters.values()]


@pytest.mark.parametrize("path", MODULES)
def test_every_public_name_with_its_signature(path: str) -> None:
    """Each module of the reference has its twin, with the same names, parameters and defaults."""

    theirs = importlib.import_module(f"golden_pendulum{path}")
    mine = importlib.import_module(f"torchjd_golden.golden_pendulum{path}")
    for name, their_object in _public_api(theirs).items():
        my_object = getattr(mine, name)
        if callable(their_object):
            assert _parameters(my_object) == _parameters(their_object), name
            if isinstance(their_object, type):
                their_members = {m for m in vars(their_object) if not m.startswith("_")}
                assert their_members <= set(dir(my_object)), (
                    name,
                    their_members - set(dir(my_object)),
                )
        else:
            assert my_object == their_object, name


def test_pro_is_an_attribute_and_the_version_is_mirrored() -> None:
    assert ours.pro is ours_pro
    assert ours.__version__ == reference.__version__


@pytest.mark.parametrize("n_tasks", [1, 2, 6, 16])
def test_golden_ratio_weights(n_tasks: int) -> None:
    assert torch.equal(ours.golden_ratio_weights(n_tasks), reference.golden_ratio_weights(n_tasks))
    double = {"dtype": torch.float64}
    assert torch.equal(
        ours.golden_ratio_weights(n_tasks, **double),
        reference.golden_ratio_weights(n_tasks, **double),
    )


def golden_pendulum_mtl(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    del pro
    balancer = gp.GoldenPendulumMTL(n_tasks=6)
    yield balancer.weight_balance_ratio, balancer.golden_targets, balancer.mean_weights()
    for step in range(6):
        weights = balancer.backward(work.losses(), work.model)
        yield weights, work.gradients(), balancer.weight_balance_ratio, balancer.golden_targets
        if step == 2:
            balancer.lam = 0.2
        work.step()
    yield balancer.weight_history, balancer.mean_weights(), balancer.mean_weights(last_n=3)
    with pytest.raises(ValueError, match="Expected 6 tasks"):
        balancer.backward(work.losses(TASKS[:4]), work.model)
    balancer.reset()
    yield balancer.weight_history, balancer.golden_targets, balancer.weight_balance_ratio


def test_golden_pendulum_mtl() -> None:
    assert_same_records(run(golden_pendulum_mtl), WORST, "GoldenPendulumMTL")


def golden_nash_backward(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    del pro
    backbone = list(work.model.backbone.parameters())
    settings = [{}, {"lam": 2.0, "pcgrad": False}, {"lam": 0.0, "n_iter": 40}]
    for step, kwargs in enumerate(settings * 2):
        shared = backbone if step % 2 else None
        weights = gp.golden_nash_backward(work.losses(), work.model, shared_params=shared, **kwargs)
        yield weights, work.gradients()
        # Without a zero_grad the heads outside shared_params accumulate, as in the reference.
        work.optimizer.step()
    yield gp.golden_nash_backward(work.losses(TASKS[:1]), work.model), work.gradients()


def test_golden_nash_backward() -> None:
    assert_same_records(run(golden_nash_backward), WORST, "golden_nash_backward")


def uncertainty_weighting(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    """
    Kendall et al.'s uncertainty weighting: learned log-variances :math:`s`, outside the model,
    in every loss :math:`e^{-s_k} L_k + s_k`. The reference's per-task ``loss.backward()`` gives
    them the sum of the tasks' gradients; so must every drop-in backward.
    """

    log_vars = torch.linspace(-0.5, 0.5, len(TASKS), dtype=torch.float64).requires_grad_()
    optimizer = torch.optim.SGD([log_vars], lr=0.1)
    backbone = list(work.model.backbone.parameters())
    adaptive = pro.AdaptiveLambda()
    dynamic = pro.DynamicK(groups=[pro.TaskGroup("ranking", tasks={"returns", "rank"})])
    engine = pro.DiagnosticsEngine()
    balancer = gp.GoldenPendulumMTL()

    def weighted(tasks: tuple[str, ...] = TASKS) -> dict[str, torch.Tensor]:
        losses = work.losses(tasks)
        return {
            name: torch.exp(-log_vars[TASKS.index(name)]) * loss + log_vars[TASKS.index(name)]
            for name, loss in losses.items()
        }

    calls = [
        lambda: gp.golden_nash_backward(weighted(), work.model),
        lambda: gp.golden_nash_backward(weighted(), work.model, shared_params=backbone),
        lambda: gp.golden_nash_backward(weighted(TASKS[:1]), work.model),
        lambda: balancer.backward(weighted(), work.model),
        lambda: adaptive.backward(weighted(), work.model),
        lambda: dynamic.backward(weighted(), work.model),
        lambda: engine.analyze(weighted(), work.model),
    ]
    for index, call in enumerate(calls):
        result = call()
        assert log_vars.grad is not None
        yield result, work.gradients(), log_vars.grad.clone()
        work.step()
        if index > 0:  # the first call's gradient is kept: the second call adds to it
            optimizer.step()
            optimizer.zero_grad()


def test_gradients_reach_tensors_outside_the_model() -> None:
    assert_same_records(run(uncertainty_weighting), WORST, "outside the model")


def adaptive_lambda(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    del gp
    adaptive = pro.AdaptiveLambda(lam_init=0.4, ema_decay=0.8, sensitivity=3.0)
    yield adaptive.current_lam, adaptive.conflict_ratio, adaptive.loss_ratio
    for step in range(8):
        tasks = TASKS if step < 5 else TASKS[:4]  # the task count changes
        weights = adaptive.backward(work.losses(tasks), work.model)
        yield weights, work.gradients(), adaptive.current_lam, adaptive.conflict_ratio
        yield adaptive.loss_ratio
        work.step()
        if step == 5:
            adaptive.reset()  # keeps lambda, restarts the averages
    yield adaptive.get_history(), adaptive.get_history(last_n=2)


def test_adaptive_lambda() -> None:
    assert_same_records(run(adaptive_lambda), WORST, "AdaptiveLambda")


def adaptive_lambda_non_positive_losses(
    gp: ModuleType, pro: ModuleType, work: Workload
) -> Iterator[Any]:
    """A loss that reaches zero, then a negative one: the reference divides by 1e-10."""

    del gp
    adaptive = pro.AdaptiveLambda(ema_decay=0.8)
    for step in range(5):
        losses = work.losses()
        if step == 1:
            losses["vol"] = 0.0 * losses["vol"]
        if step >= 2:
            losses["mae"] = losses["mae"] - 10.0  # as a log-likelihood can be
        weights = adaptive.backward(losses, work.model)
        yield weights, work.gradients(), adaptive.current_lam, adaptive.loss_ratio
        work.step()
    yield adaptive.get_history()


def test_adaptive_lambda_with_zero_and_negative_losses() -> None:
    records = run(adaptive_lambda_non_positive_losses)
    assert records["reference"][1][3] > 1e8  # the reference's loss ratio after the zero loss
    assert_same_records(records, WORST, "AdaptiveLambda (losses <= 0)")


def groups_of(dynamic: Any) -> list[tuple[str, set[str], float | None]]:
    return [(g.name, set(g.tasks), g.lam) for g in dynamic.current_groups]


def dynamic_k_manual(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    del gp
    groups = [
        pro.TaskGroup("ranking", tasks={"returns", "rank", "quality"}),
        pro.TaskGroup("risk", tasks={"vol", "mae"}, lam=0.3),
    ]
    dynamic = pro.DynamicK(groups=groups)
    for step in range(7):
        if step == 2:
            dynamic.add_task("regime", "risk")
        if step == 3:
            dynamic.add_task("quality", "meta")
            dynamic.remove_task("rank")  # now in the catch-all group
        if step == 5:
            dynamic.remove_task("vol")
        tasks = TASKS if step != 4 else ("mae", "returns", "regime", "rank")
        shared = list(work.model.backbone.parameters()) if step == 6 else None
        weights = dynamic.backward(work.losses(tasks), work.model, shared_params=shared)
        yield weights, work.gradients(), groups_of(dynamic)
        work.step()


def test_dynamic_k_manual_groups() -> None:
    assert_same_records(run(dynamic_k_manual), WORST, "DynamicK (manual)")


def dynamic_k_automatic(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    del gp
    dynamic = pro.DynamicK(auto_group=True, regroup_every=3, similarity_threshold=0.1, lam=0.7)
    for step in range(8):
        if step == 4:
            dynamic.add_task("regime", "auto_group_0")
        weights = dynamic.backward(work.losses(), work.model)
        yield weights, work.gradients(), groups_of(dynamic)
        work.step()


def test_dynamic_k_automatic_groups() -> None:
    records = run(dynamic_k_automatic)
    assert len({len(groups) for _, _, groups in records["reference"]}) > 1  # regroups happen
    assert_same_records(records, WORST, "DynamicK (auto)")


def two_phases(pro: ModuleType, events: list[str]) -> list[Any]:
    def enter(model: Any, phase: Any) -> None:
        events.append(f"enter {phase.name} {model is not None}")

    def leave(model: Any, phase: Any) -> None:
        events.append(f"exit {phase.name} {model is not None}")

    return [
        pro.Phase("A", tasks={"returns", "rank", "vol", "mae"}, steps=4, lam=0.6, lr=0.05,
                  warmup_steps=2, on_enter=enter, on_exit=leave),
        pro.Phase("B", tasks={"vol", "mae", "regime"}, steps=5, freeze_backbone=True, lam=0.3,
                  lr=0.1, pcgrad=False, warmup_steps=3, on_enter=enter, on_exit=leave),
    ]  # fmt: skip


def curriculum(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    del gp
    events: list[str] = []
    scheduler = pro.CurriculumScheduler(two_phases(pro, events), lambda m: m.backbone.parameters())
    yield scheduler.total_steps, scheduler.current_phase_name
    for step in range(9):
        if step == 6:  # resume from a checkpoint in the middle of phase B
            state = scheduler.state_dict()
            scheduler = pro.CurriculumScheduler(
                two_phases(pro, events), lambda m: m.backbone.parameters()
            )
            scheduler.load_state_dict(state)
        lr = scheduler.current_lr
        for group in work.optimizer.param_groups:
            group["lr"] = lr
        weights = scheduler.backward(work.losses(), work.model)
        yield lr, weights, work.gradients(), work.flags(), scheduler.current_phase_progress
        work.step()
        yield scheduler.step(work.model), scheduler.global_step, scheduler.is_complete
    yield events, scheduler.state_dict()
    with pytest.raises(RuntimeError, match="complete"):
        scheduler.backward(work.losses(), work.model)


def test_curriculum_scheduler() -> None:
    records = run(curriculum)
    flags = [record[3] for record in records["reference"] if len(record) == 5]
    assert flags[0][0]
    assert not flags[-1][0]  # the backbone is frozen in phase B
    assert_same_records(records, WORST, "CurriculumScheduler")


def curriculum_without_model_in_step(
    gp: ModuleType, pro: ModuleType, work: Workload
) -> Iterator[Any]:
    """The reference freezes only when a phase is entered in a call given the model."""

    del gp
    scheduler = pro.CurriculumScheduler(two_phases(pro, []), lambda m: m.backbone.parameters())
    for _ in range(6):
        yield scheduler.backward(work.losses(), work.model), work.flags()
        work.step()
        scheduler.step()


def test_curriculum_scheduler_without_model_in_step() -> None:
    records = run(curriculum_without_model_in_step)
    assert all(flags[0] for _, flags in records["reference"])  # never frozen: the reference's way
    assert_same_records(records, WORST, "CurriculumScheduler")


def curriculum_with_absent_tasks(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    """
    The reference trains the phase's tasks that have a loss and only warns when none has: a
    phase task that no loss carries ("volatility" for "vol") is silently left out. The drop-in
    keeps that (:class:`torchjd_golden.Curriculum` raises).
    """

    del gp
    phases = [
        pro.Phase("A", tasks={"returns", "rank", "volatility"}, steps=2, lam=0.6),
        pro.Phase("B", tasks={"regime"}, steps=1),
    ]
    scheduler = pro.CurriculumScheduler(phases)
    for _ in range(2):
        yield scheduler.backward(work.losses(), work.model), work.gradients()
        work.step()
        scheduler.step()
    yield scheduler.backward(work.losses(TASKS[:3]), work.model), work.gradients()


def test_curriculum_scheduler_with_absent_tasks() -> None:
    records = run(curriculum_with_absent_tasks)
    trained = [list(weights) for weights, _ in records["reference"]]
    assert trained == [["returns", "rank"], ["returns", "rank"], []]
    assert_same_records(records, WORST, "CurriculumScheduler")


def diagnostics(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
    engine = pro.DiagnosticsEngine(window_size=80, alert_conflict_ratio=0.2)
    balancer = gp.GoldenPendulumMTL(lam=0.05)
    yield engine.summary(), engine.alerts
    backbone = list(work.model.backbone.parameters())
    for step in range(60):
        losses = work.losses()
        shared = backbone if step % 7 == 3 else None
        report = engine.analyze(losses, work.model, shared_params=shared)
        yield report, engine.alerts, work.gradients()
        weights = balancer.backward(losses, work.model)
        engine.record_weights(step, weights)
        work.step()
        if step % 10 == 9:
            yield engine.summary()


def test_diagnostics_engine() -> None:
    records = run(diagnostics, lr=0.2)
    steps = [record for record in records["reference"][1:] if isinstance(record, tuple)]
    assert steps[-1][0].resonance_score > 0.0  # the resonance is computed in the last steps
    alerts = {alert.split(":")[0] for _, step_alerts, _ in steps for alert in step_alerts}
    assert alerts >= {"HIGH CONFLICT", "GRADIENT IMBALANCE", "LOW BALANCE"}
    assert_same_records(records, WORST, "DiagnosticsEngine")


def test_a_workload_on_a_knife_edge_is_refused() -> None:
    """
    With the backbone and the neck frozen, two heads share no parameter: their normalised
    Gramian is the identity and the reference's QP reads the sign of rounding. run() says so
    instead of comparing numbers that depend on the CPU.
    """

    def heads_alone(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
        del pro
        work.model.backbone.requires_grad_(False)
        work.model.neck.requires_grad_(False)
        yield gp.golden_nash_backward(work.losses(TASKS[:2]), work.model, lam=0.2, pcgrad=False)

    with pytest.raises(AssertionError, match="within rounding"):
        run(heads_alone)


def test_presets() -> None:
    assert ours_pro.list_presets() == reference_pro.list_presets()
    for name in reference_pro.list_presets():
        records = {
            "ours": [ours_pro.get_preset(name)],
            "reference": [reference_pro.get_preset(name)],
        }
        assert_same_records(records, WORST, "presets")
    for module in (ours_pro, reference_pro):
        with pytest.raises(KeyError, match=r"Unknown preset 'nope'\. Available: finance_4phase"):
            module.get_preset("nope")


def test_preset_curriculum_runs_like_the_reference() -> None:
    def script(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
        del gp
        scheduler = pro.CurriculumScheduler(pro.get_preset("robotics_control").phases)
        losses = work.losses()
        named = {"reward": losses["returns"], "safety": losses["vol"], "smoothness": losses["mae"]}
        yield scheduler.current_lr, scheduler.backward(named, work.model), work.gradients()

    assert_same_records(run(script), WORST, "presets")


class _Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_weight_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outputs = {}
    for name, module in (("ours", ours), ("reference", reference)):
        writer = _Writer()
        path = tmp_path / name / "weights.jsonl"
        logger = module.WeightLogger(log_file=str(path), log_every=2, tensorboard_writer=writer)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            for step in range(5):
                logger.log(step, {"a": 0.2 + step / 10, "b": 0.8 - step / 10})
        messages = [record.getMessage() for record in caplog.records]
        outputs[name] = (path.read_text(), writer.scalars, messages)
    assert outputs["ours"] == outputs["reference"]
    assert [json.loads(line)["step"] for line in outputs["ours"][0].splitlines()] == [0, 2, 4]


def test_golden_pendulum_callback(caplog: pytest.LogCaptureFixture) -> None:
    def script(gp: ModuleType, pro: ModuleType, work: Workload) -> Iterator[Any]:
        del pro
        callback = gp.GoldenPendulumCallback(lam=0.4, log_every=2)
        for batch in range(3):
            caplog.clear()
            with caplog.at_level(logging.INFO):
                weights = callback.on_train_batch(work.losses(), work.model, batch)
            yield weights, work.gradients(), [r.getMessage() for r in caplog.records]
            work.step()

    assert_same_records(run(script), WORST, "GoldenPendulumCallback")


def test_checkpoint_of_scheduler_loads_with_weights_only() -> None:
    scheduler = ours_pro.CurriculumScheduler(two_phases(ours_pro, []))
    for _ in range(5):
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    resumed = ours_pro.CurriculumScheduler(two_phases(ours_pro, []))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert (resumed.current_phase_name, resumed.global_step, resumed.current_lr) == (
        "B",
        5,
        0.1 * 2 / 3,
    )
