from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import pytest
import torch
from golden_pendulum.pro import DiagnosticsEngine
from torch import Tensor, nn
from torch.testing import assert_close
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import (
    GABA,
    AdaptiveGoldenPendulum,
    ConflictMonitor,
    DynamicK,
    ExcessMTL,
    GoldenPendulum,
    TaskGroup,
    golden_ratio_weights,
    gramian_diagnostics,
)
from torchjd_golden.monitoring._recorder import DiagnosticsRecorder, hook_recorder

from .._asserts import COPY_WAYS, copy_of
from .._devices import host_synchronisation_is_an_error, requires_cuda
from .._inputs import conflicting_jacobian

JACOBIAN = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, 0.5]], dtype=torch.float64)


def test_report_by_hand() -> None:
    monitor = ConflictMonitor(tasks=["a", "b", "c"])
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    monitor.record(JACOBIAN @ JACOBIAN.T, weights)
    report = monitor.report()
    assert report.step == 0
    assert report.conflict_pairs == [("a", "b", pytest.approx(-1 / math.sqrt(2)))]
    assert report.conflict_ratio == pytest.approx(1 / 3)
    assert report.gradient_norms == pytest.approx({"a": 2.0, "b": math.sqrt(2), "c": 0.5})
    assert report.norm_ratio == pytest.approx(4.0)
    targets = golden_ratio_weights(3, dtype=torch.float64)
    assert report.weight_deviation == pytest.approx(float((weights - targets).norm()))
    assert report.balance_ratio == pytest.approx(0.4)
    assert report.resonance_score == 0.0


def test_before_any_weights_the_weight_statistics_are_zero() -> None:
    monitor = ConflictMonitor()
    monitor.record(JACOBIAN @ JACOBIAN.T)
    report = monitor.report()
    assert (report.weight_deviation, report.balance_ratio) == (0.0, 0.0)
    assert list(report.gradient_norms) == [0, 1, 2]


def _reference_run(steps: int) -> Iterator[tuple[Tensor, dict[str, float], object]]:
    """The reference engine on a linear model whose rows change each step, with GP-like weights."""

    engine = DiagnosticsEngine(window_size=70)
    names = [f"t{k}" for k in range(5)]
    for step in range(steps):
        jacobian = conflicting_jacobian(5, 12, seed=step, decades=2.5)
        parameter = nn.Parameter(torch.zeros(12, dtype=torch.float64))
        model = nn.Module()
        model.parameter = parameter
        losses = {name: row @ parameter for name, row in zip(names, jacobian, strict=True)}
        report = engine.analyze(losses, model)
        weights = golden_ratio_weights(5, dtype=torch.float64) + 0.02 * math.sin(step * 2.1)
        weights_by_name = dict(zip(names, (weights / weights.sum()).tolist(), strict=True))
        yield jacobian, weights_by_name, (report, engine.alerts)
        engine.record_weights(step, weights_by_name)


def test_unrounded_values_round_to_the_references() -> None:
    """Ours keeps full precision; rounded as the reference rounds, it gives its report."""

    monitor = ConflictMonitor(window_size=70, tasks=[f"t{k}" for k in range(5)])
    decimals = {"conflict_ratio": 4, "norm_ratio": 2, "balance_ratio": 4, "resonance_score": 4}
    for jacobian, weights, (expected, alerts) in _reference_run(60):
        monitor.record(jacobian @ jacobian.T)
        report = monitor.report()
        for name, places in decimals.items():
            assert round(getattr(report, name), places) == getattr(expected, name), name
        # float64 targets here, float32 in the reference: within float32's rounding.
        assert abs(report.weight_deviation - expected.weight_deviation) < 1e-6
        assert report.gradient_norms == pytest.approx(expected.gradient_norms, rel=1e-12)
        assert [(i, j) for i, j, _ in report.conflict_pairs] == [
            (i, j) for i, j, _ in expected.conflict_pairs
        ]
        assert monitor.alerts == alerts
        monitor.record_weights(weights)
    assert expected.resonance_score > 0.0


def test_recording_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """record and record_weights only queue tensor operations, resonance included."""

    monitor = ConflictMonitor(window_size=60, tasks=list("abcd"))
    gramians = [(j @ j.T) for j in (conflicting_jacobian(4, 8, seed=s) for s in range(55))]

    def refuse(*args: object) -> None:
        raise AssertionError("host read while recording")

    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(Tensor, method, refuse)
        for step, gramian in enumerate(gramians):
            monitor.record(gramian, torch.softmax(gramian.diagonal() * (step % 3), 0))
    assert monitor.report().resonance_score > 0.0


def test_resonance_of_an_oscillation_by_hand() -> None:
    """A first-task weight alternating a +- d: the autocorrelation at lag 2 is (L - 2) / L."""

    monitor = ConflictMonitor(tasks=["a", "b"])
    gramian = torch.eye(2, dtype=torch.float64)
    for step in range(120):
        first = 0.4 + (0.1 if step % 2 else -0.1)
        monitor.record(gramian, torch.tensor([first, 1.0 - first], dtype=torch.float64))
        if step == 48:
            assert monitor.report().resonance_score == 0.0  # fewer than 50 weight records
    assert monitor.report().resonance_score == pytest.approx(98 / 100)
    assert any(alert.startswith("RESONANCE DETECTED: score 0.980") for alert in monitor.alerts)

    constant = ConflictMonitor()
    for _ in range(60):
        constant.record(gramian, torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert constant.report().resonance_score == 0.0


def test_window_history_and_summary() -> None:
    monitor = ConflictMonitor(window_size=4)
    assert monitor.summary() == "No diagnostics recorded yet."
    assert monitor.alerts == []
    with pytest.raises(ValueError, match="record"):
        monitor.report()
    for k in range(6):
        jacobian = torch.tensor([[1.0, 0.0], [float(k + 1), 0.0]], dtype=torch.float64)
        monitor.record(jacobian @ jacobian.T)
    history = monitor.history()
    assert history["norm_ratio"].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert history["conflict_ratio"].tolist() == [0.0] * 4
    assert "Avg norm ratio:       4.5x" in monitor.summary()
    assert "(last 4 steps)" in monitor.summary()


def test_alerts_use_the_reference_thresholds() -> None:
    monitor = ConflictMonitor(alert_norm_ratio=3.0, alert_conflict_ratio=0.3)
    monitor.record(JACOBIAN @ JACOBIAN.T, torch.tensor([0.04, 0.46, 0.5], dtype=torch.float64))
    assert [alert.split(":")[0] for alert in monitor.alerts] == [
        "HIGH CONFLICT",
        "GRADIENT IMBALANCE",
        "LOW BALANCE",
    ]
    assert "  ALERTS:\n    ! HIGH CONFLICT: 33.33% of task pairs conflicting" in monitor.summary()


def _train(aggregator: nn.Module, monitor: ConflictMonitor, steps: int = 3) -> list[Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    jacobians = []
    for _ in range(steps):
        losses = (model(torch.randn(16, 5)) * torch.tensor([3.0, -1.0, 0.2])).pow(2).mean(0)
        backward(losses)
        jacobians.append(torch.cat([p.jac.flatten(1) for p in model.parameters()], dim=1))
        jac_to_grad(list(model.parameters()), aggregator)
    return jacobians


def test_attached_to_golden_pendulum_it_records_alpha() -> None:
    aggregator = GoldenPendulum()
    monitor = ConflictMonitor(tasks=["x", "y", "z"])
    handle = monitor.attach(aggregator)
    jacobians = _train(aggregator, monitor)
    assert monitor.step_count == 3
    diagnostics = gramian_diagnostics(jacobians[-1] @ jacobians[-1].T)
    report = monitor.report()
    assert report.conflict_ratio == pytest.approx(float(diagnostics.conflict_ratio))
    assert report.balance_ratio == pytest.approx(float(aggregator.balance_ratio))
    handle.remove()
    _train(aggregator, monitor, steps=1)
    assert monitor.step_count == 3


@pytest.mark.parametrize("make", [GABA, ExcessMTL], ids=["GABA", "ExcessMTL"])
def test_attached_to_other_aggregators(make: type[nn.Module]) -> None:
    """Returned weights for GABA; for a Jacobian aggregator, the Gramian of its Jacobian."""

    aggregator = make()
    monitor = ConflictMonitor()
    weights = []
    aggregator.weighting.register_forward_hook(lambda _m, _i, w: weights.append(w))
    monitor.attach(aggregator)
    jacobians = _train(aggregator, monitor)
    gramian = (jacobians[-1] @ jacobians[-1].T).double()
    report = monitor.report()
    assert report.norm_ratio == pytest.approx(
        float(gramian_diagnostics(gramian).norm_ratio), rel=1e-5
    )
    last = weights[-1].double()
    assert report.balance_ratio == pytest.approx(float(last.min() / last.max()), rel=1e-6)


def test_task_names_come_from_the_aggregator() -> None:
    """The aggregator's names of the call's rows, else the monitor's own, else the indices."""

    aggregator = DynamicK([TaskGroup("g", ["p", "q"])])
    aggregator.tasks = ["p", "q", "r"]
    monitor = ConflictMonitor(tasks=["u", "v", "w"])
    monitor.attach(aggregator)
    _train(aggregator, monitor, steps=1)
    assert list(monitor.report().gradient_norms) == ["p", "q", "r"]
    aggregator.tasks = None
    _train(aggregator, monitor, steps=1)
    assert list(monitor.report().gradient_norms) == ["u", "v", "w"]
    monitor.tasks = None
    _train(aggregator, monitor, steps=1)
    assert list(monitor.report().gradient_norms) == [0, 1, 2]


def test_weights_by_name_follow_the_names() -> None:
    """Weights of tasks that come and go land in their own columns of the window."""

    monitor = ConflictMonitor()
    monitor.record_weights({"a": 0.5, "b": 0.5})
    monitor.record_weights({"c": 0.2, "a": 0.8})
    monitor.record(torch.eye(2, dtype=torch.float64), tasks=["c", "a"])
    report = monitor.report()
    assert report.balance_ratio == pytest.approx(0.25)
    expected = golden_ratio_weights(2, dtype=torch.float64) - torch.tensor(
        [0.2, 0.8], dtype=torch.float64
    )
    assert report.weight_deviation == pytest.approx(float(expected.norm()))


def test_weights_given_as_floats_with_a_gramian_elsewhere() -> None:
    """Weights by name (host floats) and Gramians as tensors: the window follows the weights."""

    monitor = ConflictMonitor(tasks=["a", "b"])
    for step in range(56):
        monitor.record_weights({"a": 0.3 + 0.1 * (step % 2), "b": 0.7 - 0.1 * (step % 2)})
        monitor.record(torch.eye(2, dtype=torch.float32))
    assert monitor.report().resonance_score == pytest.approx(54 / 56)  # (L - 2) / L at lag 2


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="window_size"):
        ConflictMonitor(window_size=0)
    with pytest.raises(ValueError, match="3 task names"):
        ConflictMonitor(tasks=["a", "b", "c"]).record(torch.eye(2))
    with pytest.raises(TypeError, match="`Linear` does not combine the rows with a weighting"):
        ConflictMonitor().attach(nn.Linear(2, 2))


class Recorder:
    """A user's recorder, with the protocol's `record`."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor | None, object]] = []

    def record(
        self, gramian: Tensor, weights: Tensor | None = None, *, tasks: object = None
    ) -> None:
        self.calls.append((gramian, weights, tasks))


@pytest.mark.parametrize("make", [GoldenPendulum, GABA, ExcessMTL])
def test_a_monitor_and_a_users_recorder_get_the_same_records(make: type[nn.Module]) -> None:
    """One protocol, one hook: a recorder attached as the monitor is sees what it records."""

    aggregator = make()
    aggregator.tasks = ["p", "q", "r"]
    monitor, recorder, by_hand = ConflictMonitor(), Recorder(), ConflictMonitor()
    assert isinstance(monitor, DiagnosticsRecorder)
    monitor.attach(aggregator)
    hook_recorder(aggregator, recorder)
    _train(aggregator, monitor, steps=2)

    assert [tasks for _, _, tasks in recorder.calls] == [("p", "q", "r")] * 2
    for gramian, weights, tasks in recorder.calls:
        by_hand.record(gramian, weights, tasks=tasks)
    assert monitor.report() == by_hand.report()
    if make is GoldenPendulum:  # the QP solution, as golden-pendulum-mtl reports its weights
        assert torch.equal(recorder.calls[-1][1], aggregator.alpha)


class Holder(nn.Module):
    """A model holding an aggregator, and the monitor attached to it as a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.aggregator = GoldenPendulum()
        self.monitor = ConflictMonitor(tasks=["x", "y", "z"])
        self.monitor.attach(self.aggregator)


@pytest.mark.parametrize("how", COPY_WAYS)
def test_a_module_with_a_monitor_attached_copies_with_its_own_monitor(how: str) -> None:
    holder = Holder()
    _train(holder.aggregator, holder.monitor, steps=2)
    twin = copy_of(holder, how)
    assert twin.monitor is not holder.monitor
    assert twin.monitor.history().keys() == holder.monitor.history().keys()
    for name, values in holder.monitor.history().items():
        assert torch.equal(twin.monitor.history()[name], values)

    jacobians = _train(twin.aggregator, twin.monitor, steps=1)
    assert (twin.monitor.step_count, holder.monitor.step_count) == (3, 2)
    expected = gramian_diagnostics(jacobians[-1].double() @ jacobians[-1].double().T)
    report = twin.monitor.report()
    assert report.conflict_ratio == pytest.approx(float(expected.conflict_ratio))
    assert list(report.gradient_norms) == ["x", "y", "z"]
    assert report.balance_ratio == pytest.approx(float(twin.aggregator.balance_ratio))

    # An aggregator alone: its copy's hook records into a copy of the monitor.
    aggregator, monitor = GoldenPendulum(), ConflictMonitor()
    monitor.attach(aggregator)
    copied = copy_of(aggregator, how)
    _train(copied, monitor, steps=1)
    (hook,) = copied.gramian_weighting._forward_hooks.values()
    assert (hook.recorder.step_count, monitor.step_count) == (1, 0)


@requires_cuda
def test_no_synchronisation_on_cuda() -> None:
    """Recording on CUDA never synchronises, and gives the CPU's statistics."""

    on_cpu, on_cuda = ConflictMonitor(tasks=list("abcd")), ConflictMonitor(tasks=list("abcd"))
    gramians = [j @ j.T for j in (conflicting_jacobian(4, 8, seed=s) for s in range(55))]
    weights = [torch.softmax(g.diagonal() * (k % 3), 0) for k, g in enumerate(gramians)]
    for gramian, w in zip(gramians, weights, strict=True):
        on_cpu.record(gramian, w)
    inputs = [(g.cuda(), w.cuda()) for g, w in zip(gramians, weights, strict=True)]
    with host_synchronisation_is_an_error():
        for gramian, w in inputs:
            on_cuda.record(gramian, w)
    for name, values in on_cpu.history().items():
        assert_close(on_cuda.history()[name].cpu(), values, rtol=1e-10, atol=1e-12)
    assert on_cuda.report().resonance_score > 0.0


def _with_losses(aggregator: AdaptiveGoldenPendulum) -> Callable[[Tensor], Tensor]:
    def step(jacobian: Tensor) -> Tensor:
        aggregator.losses = jacobian.abs().sum(dim=1) + 1e-3  # the adaptive variant's extra input
        return aggregator(jacobian)

    return step


# The aggregators whose QP solution an attached monitor records: each family, by hand.
ATTACHED_ON_CUDA: dict[str, Callable[[], nn.Module]] = {
    "GoldenPendulum": GoldenPendulum,
    "AdaptiveGoldenPendulum": AdaptiveGoldenPendulum,
    "DynamicK": lambda: DynamicK([TaskGroup("first", [0, 1]), TaskGroup("second", [2, 3])]),
}


@requires_cuda
@pytest.mark.parametrize("name", ATTACHED_ON_CUDA)
def test_attached_on_cuda_it_records_without_a_sync_what_it_records_on_the_cpu(name: str) -> None:
    jacobians = [conflicting_jacobian(4, 30, seed=s, decades=2.0) for s in range(6)]
    monitors = {}
    for device in ("cpu", "cuda"):
        aggregator = ATTACHED_ON_CUDA[name]().to(device)
        step = (
            _with_losses(aggregator)
            if isinstance(aggregator, AdaptiveGoldenPendulum)
            else aggregator
        )
        monitors[device] = ConflictMonitor(tasks=list("abcd"))
        monitors[device].attach(aggregator)
        inputs = [jacobian.to(device) for jacobian in jacobians]
        step(inputs[0])  # the first call allocates the state
        with host_synchronisation_is_an_error() if device == "cuda" else nullcontext():
            for jacobian in inputs[1:]:
                step(jacobian)
    assert monitors["cuda"].step_count == monitors["cpu"].step_count == len(jacobians)
    # The CPU runs the host kernels, CUDA the tensor kernels: they agree to about 1e-10.
    for key, values in monitors["cpu"].history().items():
        assert_close(monitors["cuda"].history()[key].cpu(), values, rtol=1e-9, atol=1e-9)
