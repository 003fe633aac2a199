"""The trainer-free core of the integrations: reading per-task losses, one step of accumulation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn
from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import ConflictMonitor, GCond, GoldenPendulum, gramian_diagnostics
from torchjd_golden.step._task_step import JacobianStep, TaskLosses, split_task_losses


def _losses(seed: int = 0) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    return model, ((model(torch.randn(8, 4)) - torch.randn(8, 3)) ** 2).mean(dim=0)


def test_the_forms_of_per_task_losses() -> None:
    a, b = torch.tensor(1.0), torch.tensor([2.0])
    features = torch.ones(2)

    names, vector, none = split_task_losses({"seg": a, "depth": b})
    assert names == ("seg", "depth")
    assert vector.tolist() == [1.0, 2.0]
    assert none is None
    assert split_task_losses([a, b])[0] == ("task_0", "task_1")
    assert split_task_losses(torch.tensor([3.0, 4.0, 5.0]))[0] == ("task_0", "task_1", "task_2")
    assert split_task_losses(torch.tensor(3.0))[0] == ("task_0",)
    assert split_task_losses(TaskLosses({"a": a}, features=features))[2] is features
    # A model's output mapping with a `losses` entry (a Hugging Face ModelOutput, say).
    names, _, given = split_task_losses({"losses": {"a": a}, "features": features, "logits": b})
    assert names == ("a",)
    assert given is features


@pytest.mark.parametrize(
    ("output", "error", "message"),
    [
        ({}, ValueError, "no task loss"),
        ({"a": torch.ones(2)}, ValueError, "loss of task 'a' must be a scalar tensor"),
        ([1.0], ValueError, "loss of task 'task_0' must be a scalar tensor"),
        (torch.ones(2, 2), ValueError, r"must be a vector.*shape \(2, 2\)"),
        ("loss", TypeError, "must give per-task losses"),
        (3.0, TypeError, "must give per-task losses"),
    ],
)
def test_what_is_not_per_task_losses_is_named(output: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        split_task_losses(output)


def test_micro_batches_add_up_and_resolve_once() -> None:
    """Two micro-batches of half the loss: the Jacobian of the mean, one GCond call."""

    step = JacobianStep(GCond())
    model, _ = _losses()
    reference_model, _ = _losses()  # the same initial parameters
    reference = GCond()
    total = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        inputs, targets = torch.randn(8, 4), torch.randn(8, 3)
        losses = ((model(inputs) - targets) ** 2).mean(dim=0)
        step.backward(step.take({"a": losses[0], "b": losses[1], "c": losses[2]}) / 2, model)
        total.append(((reference_model(inputs) - targets) ** 2).mean(dim=0) / 2)
    weights = step.resolve()
    backward(total[0] + total[1])
    expected = jac_to_grad(reference_model.parameters(), reference)

    assert weights is None  # GCond's momentum: no weights
    assert expected is None
    assert step.aggregated
    assert torch.equal(step.aggregator.resolution_weights, reference.resolution_weights)  # type: ignore[arg-type]
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
    assert int(step.aggregator.weighting.step_count) == 1  # type: ignore[union-attr]
    assert step.weight_scalars() == {}


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)])

    def losses(self, seed: int) -> tuple[dict[str, Tensor], Tensor]:
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = (
            torch.randn(8, 4, generator=generator),
            torch.randn(8, 3, generator=generator),
        )
        features = self.trunk(inputs)
        return {
            name: ((head(features)[:, 0] - targets[:, k]) ** 2).mean()
            for k, (name, head) in enumerate(zip("abc", self.heads, strict=True))
        }, features


@pytest.mark.parametrize(
    "shared",
    [
        "trunk",
        ["trunk.0"],
        "the module",
        lambda model: model.trunk,
        lambda model: model.trunk.parameters(),
    ],
)
def test_shared_parameters_named_step_as_found_from_the_features(shared: object) -> None:
    """The trunk named (by name, names, itself or a callable of the model) is the trunk found."""

    torch.manual_seed(0)
    named, found = _TwoHeads(), _TwoHeads()
    found.load_state_dict(named.state_dict())
    shared = named.trunk if shared == "the module" else shared
    for model, step in (
        (named, JacobianStep("upgrad", shared=shared)),
        (found, JacobianStep("upgrad")),
    ):
        for seed in (1, 2):  # two micro-batches, one aggregation
            losses, features = model.losses(seed)
            step.backward(step.take(TaskLosses(losses, features=features)) / 2, model)
        step.resolve()
    for (name, p), q in zip(named.named_parameters(), found.parameters(), strict=True):
        assert p.grad is not None
        assert torch.equal(p.grad, q.grad), name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shared", "error", "message"),
    [
        (3, TypeError, "Parameter `shared` must be None.*Found 3"),
        ([], TypeError, r"Parameter `shared` must be None.*Found \[\]"),
        (["trunk", 1], TypeError, "Parameter `shared` must be None"),
    ],
)
def test_a_shared_argument_of_the_wrong_type_is_refused(
    shared: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        JacobianStep("upgrad", shared=shared)  # type: ignore[arg-type]


def test_a_shared_name_that_is_no_submodule_is_named() -> None:
    model = _TwoHeads()
    step = JacobianStep("upgrad", shared="backbone")
    with pytest.raises(
        ValueError, match="names 'backbone', which is not a submodule of the model _TwoHeads"
    ):
        step.bind(model)


def test_the_source_of_the_weights_may_be_in_the_aggregators_config() -> None:
    """
    A trainer configured from one file gives ``gramian_from`` beside the method; given twice,
    differently, it is refused.
    """

    config = {"name": "golden_pendulum", "lam": 2.0, "gramian_from": "features"}
    step = JacobianStep(config)
    assert step.gramian_from == "features"
    assert isinstance(step.aggregator, GoldenPendulum)
    assert step.aggregator.lam == 2.0
    assert config["gramian_from"] == "features"  # the user's config is left as it was
    assert JacobianStep({"name": "gcond"}).gramian_from == "parameters"
    with pytest.raises(ValueError, match="give it once"):
        JacobianStep({"name": "golden_pendulum", "gramian_from": "parameters"}, False, "features")
    with pytest.raises(ValueError, match="gramian_from"):  # a Jacobian weighting has no features
        JacobianStep({"name": "gcond", "gramian_from": "features"})


def test_golden_pendulum_adds_alpha_to_the_scalars() -> None:
    step = JacobianStep("golden_pendulum")
    model, losses = _losses()
    step.backward(step.take(losses), model)
    step.resolve()
    scalars = step.weight_scalars()
    alpha = step.aggregator.alpha  # type: ignore[union-attr]
    assert [float(scalars[f"alpha/task_{k}"]) for k in range(3)] == alpha.tolist()
    assert float(scalars["alpha_balance_ratio"]) == pytest.approx(float(alpha.min() / alpha.max()))


def test_the_tasks_must_not_change_within_a_step() -> None:
    step = JacobianStep("mean")
    model, losses = _losses()
    step.backward(step.take({"a": losses[0], "b": losses[1]}), model)
    with pytest.raises(ValueError, match=r"from \['a', 'b'\] to \['a', 'c'\]"):
        step.take({"a": losses[0], "c": losses[2]})
    step.resolve()
    step.take({"a": losses[0], "c": losses[2]})  # a new step may have other tasks


def test_a_step_without_backward_resolves_nothing() -> None:
    model, _ = _losses()
    step = JacobianStep("upgrad")
    assert step.resolve() is None
    assert not step.aggregated
    assert all(p.grad is None for p in model.parameters())


def test_the_adaptive_golden_pendulum_gets_the_losses() -> None:
    step = JacobianStep("adaptive_golden_pendulum")
    seen: list[Tensor] = []
    step.aggregator.gramian_weighting.register_forward_pre_hook(  # type: ignore[union-attr]
        lambda module, _args: seen.append(module.losses)
    )
    model, losses = _losses()
    step.backward(step.take(losses / 2), model)
    _, more = _losses(1)
    step.backward(step.take(more / 2), model)
    step.resolve()
    torch.testing.assert_close(seen[0], (losses + more).detach() / 2)


def test_the_default_diagnostics_are_the_engine_fed_by_the_step() -> None:
    step = JacobianStep(UPGrad(), diagnostics=True)
    assert isinstance(step.recorder, ConflictMonitor)
    model, losses = _losses()
    step.backward(step.take(losses), model)
    jacobian = torch.cat([p.jac.flatten(1) for p in model.parameters()], dim=1)  # type: ignore[attr-defined]
    step.resolve()

    expected = gramian_diagnostics(jacobian.double() @ jacobian.double().T)
    scalars = step.recorder.scalars()
    assert set(scalars) >= {"conflict_ratio", "norm_ratio", "balance_ratio", "resonance"}
    torch.testing.assert_close(scalars["conflict_ratio"], expected.conflict_ratio.double())
    torch.testing.assert_close(scalars["norm_ratio"], expected.norm_ratio, rtol=1e-5, atol=0.0)


def test_a_monitor_of_ones_own_is_fed_as_the_default_engine() -> None:
    """diagnostics=ConflictMonitor(): the same hook as diagnostics=True, names from the step."""

    monitor = ConflictMonitor()
    step = JacobianStep(UPGrad(), diagnostics=monitor)
    default = JacobianStep(UPGrad(), diagnostics=True)
    assert step.recorder is monitor
    for current in (step, default):
        model, losses = _losses()
        current.backward(
            current.take({"seg": losses[0], "depth": losses[1], "edge": losses[2]}), model
        )
        current.resolve()
    assert isinstance(default.recorder, ConflictMonitor)
    for engine in (monitor, default.recorder):
        assert engine.step_count == 1
        assert list(engine.report().gradient_norms) == ["seg", "depth", "edge"]
    assert monitor.report() == default.recorder.report()


class OldRecorder:
    def record(self, gramian: Tensor, weights: Tensor, tasks: object, /) -> None:
        raise AssertionError("never called")


def test_a_recorder_must_have_the_record_method_of_the_protocol() -> None:
    expected = r"`diagnostics` must be an object with a method `record\(gramian, weights=None"
    with pytest.raises(TypeError, match=expected + ".*Found object"):
        JacobianStep("upgrad", diagnostics=object())  # type: ignore[arg-type]
    # A mismatch is named when the step is made, not at the first training step.
    with pytest.raises(TypeError, match=expected + r".*OldRecorder with `record\(gramian, "):
        JacobianStep("upgrad", diagnostics=OldRecorder())  # type: ignore[arg-type]


def test_an_aggregator_without_weights_records_its_gramian_alone() -> None:
    """TrimmedMean combines no rows: a recorder gets the Gramian of its Jacobian, no weights."""

    monitor = ConflictMonitor()
    step = JacobianStep({"name": "trimmed_mean", "trim_number": 1}, diagnostics=monitor)
    model, losses = _losses()
    step.backward(step.take({"seg": losses[0], "depth": losses[1], "edge": losses[2]}), model)
    jacobian = torch.cat([p.jac.reshape(3, -1) for p in model.parameters()], dim=1)  # type: ignore[attr-defined]
    step.resolve()
    report = monitor.report()
    assert list(report.gradient_norms) == ["seg", "depth", "edge"]
    expected = jacobian.double().norm(dim=1)
    assert list(report.gradient_norms.values()) == pytest.approx(expected.tolist(), rel=1e-6)
    assert report.balance_ratio == 0.0  # no weights recorded


def test_the_scaled_aggregator_is_built_once_per_scaler() -> None:
    model, losses = _losses()
    step = JacobianStep(GoldenPendulum())
    step.backward(step.take(losses), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    step.resolve(scaler)
    engine = step.engine
    assert engine is not None
    assert engine._aggregator_in_use() is engine._aggregator_in_use()
    assert engine._aggregator_in_use() is not step.aggregator
    engine.scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert engine._aggregator_in_use() is step.aggregator


def test_the_package_does_not_import_the_trainers() -> None:
    trainers = "{'lightning', 'transformers', 'accelerate'}"
    code = f"import sys, torchjd_golden; print(sorted({trainers} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
