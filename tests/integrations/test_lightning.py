"""
MultiTaskModule under a real ``lightning.Trainer``: the same parameters as a plain torchjd loop
(accumulation, clipping, mixed precision), bit-identical resumption, names and logs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchjd.aggregation import Aggregator
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from torchjd_golden import (
    ConflictMonitor,
    aggregator_from_config,
    gramian_diagnostics,
    with_grad_scaler,
)
from torchjd_golden.integrations.lightning import MultiTaskModule, TaskLosses

from .._asserts import COPY_WAYS, copy_of
from .._methods import NamedMean

# Lightning's own notices and hints (not about this package).
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

NAMES = ("x", "y", "z")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Model(MultiTaskModule):
    def __init__(
        self, aggregator: Any = "gcond", features: bool = True, sgd: bool = False, **options: Any
    ) -> None:
        super().__init__(aggregator, **options)
        self.save_hyperparameters(ignore=["options"])
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.heads = nn.ModuleDict({name: nn.Linear(16, 1) for name in NAMES})

    def task_losses(self, batch: Sequence[Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        inputs, targets = batch
        features = self.trunk(inputs)
        losses = {
            name: ((head(features)[:, 0] - targets[:, k]) ** 2).mean()
            for k, (name, head) in enumerate(self.heads.items())
        }
        return losses, features

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Any:
        losses, features = self.task_losses(batch)
        return TaskLosses(losses, features=features) if self.hparams.features else losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.sgd:  # its step follows the gradient's scale, where Adam's does not
            return torch.optim.SGD(self.parameters(), lr=1e-2)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 8, generator=generator)
    targets = torch.stack([inputs[:, 0], -inputs[:, 0] + inputs[:, 1], 5 * inputs[:, 2]], dim=1)
    return DataLoader(TensorDataset(inputs, targets), batch_size=8)  # 8 batches, in order


def trainer(epochs: int, **options: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def plain_loop(
    model: Model,
    aggregator: Aggregator,
    epochs: int,
    *,
    accumulate: int = 1,
    clip: float | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """The same training with torchjd's functions by hand: the reference for the module."""

    optimizer = model.configure_optimizers()
    resolving = aggregator if scaler is None else with_grad_scaler(aggregator, scaler)
    for _ in range(epochs):
        batches = list(data())
        for start in range(0, len(batches), accumulate):
            for batch in batches[start : start + accumulate]:
                context = torch.autocast("cpu", autocast) if autocast else nullcontext()
                with context:
                    losses, features = model.task_losses(batch)
                vector = torch.stack(list(losses.values())) / accumulate
                if scaler is not None:
                    vector = scaler.scale(vector)
                if model.hparams.features:
                    mtl_backward(list(vector.unbind()), features=features, retain_graph=True)
                else:
                    backward(vector)
            if hasattr(type(aggregator), "tasks"):  # as the integration names them
                aggregator.tasks = list(losses)  # type: ignore[attr-defined]
            jac_to_grad([p for p in model.parameters() if hasattr(p, "jac")], resolving)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()


def _assert_same_parameters(first: nn.Module, second: nn.Module) -> None:
    for (name, p), q in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("features", "accumulate", "clip"),
    [(True, 1, None), (True, 2, 0.5), (False, 1, 0.5), (False, 2, None)],
)
def test_fit_equals_a_plain_torchjd_loop(
    features: bool, accumulate: int, clip: float | None
) -> None:
    """mtl_backward or backward per micro-batch, one jac_to_grad per step, then clipping."""

    torch.manual_seed(0)
    module = Model("gcond", features=features)
    options = {"gradient_clip_val": clip} if clip is not None else {}
    trainer(2, accumulate_grad_batches=accumulate, **options).fit(module, data())

    torch.manual_seed(0)
    reference = Model("gcond", features=features)
    aggregator = aggregator_from_config("gcond")
    plain_loop(reference, aggregator, 2, accumulate=accumulate, clip=clip)

    _assert_same_parameters(module, reference)
    for key, value in aggregator.state_dict().items():
        assert torch.equal(module.aggregator.state_dict()[key], value), key
    assert int(module.aggregator.weighting.step_count) == 16 // accumulate


def test_bf16_mixed_equals_autocast_by_hand() -> None:
    torch.manual_seed(0)
    module = Model("golden_pendulum")
    trainer(1, precision="bf16-mixed").fit(module, data())

    torch.manual_seed(0)
    reference = Model("golden_pendulum")
    plain_loop(reference, aggregator_from_config("golden_pendulum"), 1, autocast=torch.bfloat16)
    _assert_same_parameters(module, reference)


def test_16_mixed_takes_the_loss_scale_out() -> None:
    """
    The scaler path of ``precision="16-mixed"`` (run here on the CPU, where Lightning needs the
    plugin given explicitly): Golden Pendulum is scale-free, so without the scale taken out its
    update would come out 1024 times too small.
    """

    torch.manual_seed(0)
    module = Model("golden_pendulum", sgd=True)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024))
    trainer(1, plugins=[plugin], gradient_clip_val=1.0).fit(module, data())

    torch.manual_seed(0)
    reference = Model("golden_pendulum", sgd=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    plain_loop(
        reference,
        aggregator_from_config("golden_pendulum"),
        1,
        clip=1.0,
        autocast=torch.float16,
        scaler=scaler,
    )
    _assert_same_parameters(module, reference)
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() == scaler.get_scale() == 1024.0  # no step was skipped

    torch.manual_seed(0)
    unscaled = Model("golden_pendulum", sgd=True)
    start = [p.clone() for p in unscaled.trunk.parameters()]
    plain_loop(unscaled, aggregator_from_config("golden_pendulum"), 1, clip=1.0)
    for p, q, p0 in zip(module.trunk.parameters(), unscaled.trunk.parameters(), start, strict=True):
        # The same update as in float32, to float16 rounding (not 1024 times smaller).
        torch.testing.assert_close(p - p0, q - p0, rtol=0.05, atol=1e-4)


def _fit_in_two_halves(
    path: Path, aggregator: str, accumulate: int, epochs: int = 4
) -> tuple[Model, Trainer, Model, Trainer]:
    torch.manual_seed(0)
    uninterrupted = Model(aggregator)
    whole = trainer(epochs, accumulate_grad_batches=accumulate)
    whole.fit(uninterrupted, data())

    torch.manual_seed(0)
    first_half = Model(aggregator)
    half = trainer(epochs // 2, accumulate_grad_batches=accumulate)
    half.fit(first_half, data())
    half.save_checkpoint(path)
    resumed = Model(aggregator)  # a fresh instance: an empty aggregator state
    rest = trainer(epochs, accumulate_grad_batches=accumulate)
    rest.fit(resumed, data(), ckpt_path=path)
    return uninterrupted, whole, resumed, rest


@pytest.mark.parametrize(
    ("aggregator", "accumulate"), [("gcond", 1), ("gcond", 2), ("excess_mtl", 2), ("gaba", 1)]
)
def test_a_resumed_run_is_bit_identical(aggregator: str, accumulate: int, tmp_path: Path) -> None:
    path = tmp_path / "halfway.ckpt"
    uninterrupted, whole, resumed, rest = _fit_in_two_halves(path, aggregator, accumulate)

    _assert_same_parameters(uninterrupted, resumed)
    for key, value in uninterrupted.aggregator.state_dict().items():
        assert torch.equal(value, resumed.aggregator.state_dict()[key]), key
    optimizer_state = whole.optimizers[0].state_dict()["state"]
    for index, state in rest.optimizers[0].state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, optimizer_state[index][key]), (index, key)

    checkpoint = torch.load(path, weights_only=True)
    saved = {k for k in checkpoint["state_dict"] if k.startswith("aggregator.")}
    assert saved == {f"aggregator.{k}" for k in uninterrupted.aggregator.state_dict()}
    assert checkpoint["hyper_parameters"]["aggregator"] == aggregator
    step_count = next(v for k, v in checkpoint["state_dict"].items() if k.endswith("step_count"))
    assert int(step_count) == 16 // accumulate  # two epochs of 8 batches


@pytest.mark.parametrize("features", [True, False])
def test_the_aggregator_gets_the_task_names(features: bool) -> None:
    aggregator = NamedMean()
    trainer(1, accumulate_grad_batches=2).fit(Model(aggregator, features=features), data())
    assert aggregator.seen == [NAMES] * 4  # one per optimizer step


def test_a_stateful_aggregator_keys_its_state_by_the_task_names() -> None:
    module = Model("gaba")
    trainer(1).fit(module, data())
    assert module.aggregator.known_tasks == NAMES


class VectorModel(Model):
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Any:
        return torch.stack(list(self.task_losses(batch)[0].values()))


def test_a_vector_of_losses_names_the_tasks_by_position() -> None:
    aggregator = NamedMean()
    trainer(1, max_steps=1).fit(VectorModel(aggregator), data())
    assert aggregator.seen == [("task_0", "task_1", "task_2")]


def test_the_weights_are_logged_by_task_name() -> None:
    module = Model("golden_pendulum")
    seen: list[Tensor] = []
    module.aggregator.gramian_weighting.register_forward_hook(lambda _m, _i, w: seen.append(w))
    fit = trainer(1)
    fit.fit(module, data())

    metrics = fit.callback_metrics
    for k, name in enumerate(NAMES):
        assert float(metrics[f"task_weights/weight/{name}"]) == pytest.approx(float(seen[-1][k]))
        alpha = module.aggregator.alpha
        assert float(metrics[f"task_weights/alpha/{name}"]) == pytest.approx(float(alpha[k]))
    assert float(metrics["task_weights/alpha_balance_ratio"]) == pytest.approx(
        float(module.aggregator.balance_ratio)
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor | None, Any]] = []

    def record(self, gramian: Tensor, weights: Tensor | None = None, *, tasks: Any = None) -> None:
        self.calls.append((gramian, weights, tasks))


@pytest.mark.parametrize("aggregator", ["golden_pendulum", "upgrad"])
def test_diagnostics_get_the_gramian_the_aggregation_used(aggregator: str) -> None:
    """The Gramian the weighting took, the weights the method reports (Golden Pendulum's QP
    solution alpha, the returned weights otherwise) and the task names, for any aggregator."""

    recorder = Recorder()
    module = Model(aggregator, diagnostics=recorder)
    inputs: list[Tensor] = []
    reported: list[Tensor] = []
    weighting = module.aggregator.gramian_weighting
    weighting.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    weighting.register_forward_hook(
        lambda m, _i, w: reported.append(w if aggregator == "upgrad" else m.alpha.clone())
    )
    trainer(1, max_steps=3).fit(module, data())

    assert len(recorder.calls) == 3
    for (gramian, weights, tasks), used, expected in zip(
        recorder.calls, inputs, reported, strict=True
    ):
        assert torch.equal(gramian, used)
        assert weights is not None
        assert torch.equal(weights, expected)
        assert tasks == NAMES


def test_a_conflict_monitor_of_ones_own_is_attached_as_the_default_is() -> None:
    monitor = ConflictMonitor(window_size=10)
    module = Model("upgrad", diagnostics=monitor)
    assert module.diagnostics is monitor
    fit = trainer(1, max_steps=3)
    fit.fit(module, data())

    assert monitor.step_count == 3
    assert list(monitor.report().gradient_norms) == list(NAMES)  # the step's names, not 0, 1, 2
    assert float(fit.callback_metrics["diagnostics/conflict_ratio"]) == pytest.approx(
        monitor.report().conflict_ratio
    )


@pytest.mark.parametrize("how", COPY_WAYS)
def test_a_module_with_diagnostics_copies_with_its_own_monitor(how: str) -> None:
    module = Model("golden_pendulum", diagnostics=ConflictMonitor())
    trainer(1, max_steps=2).fit(module, data())
    twin = copy_of(module, how)

    assert twin.diagnostics is not module.diagnostics
    assert twin.diagnostics.step_count == module.diagnostics.step_count == 2
    jacobian = torch.randn(3, 5)
    twin._jacobian_step.tasks = ("p", "q", "r")
    twin.aggregator(jacobian)
    assert (twin.diagnostics.step_count, module.diagnostics.step_count) == (3, 2)
    assert list(twin.diagnostics.report().gradient_norms) == ["p", "q", "r"]
    expected = gramian_diagnostics(jacobian.double() @ jacobian.double().T)
    assert twin.diagnostics.report().conflict_ratio == pytest.approx(float(expected.conflict_ratio))


def test_the_default_diagnostics_are_logged() -> None:
    module = Model("gcond", diagnostics=True)  # a weighting of the Jacobian: its Gramian is made
    jacobians: list[Tensor] = []
    module.aggregator.weighting.register_forward_pre_hook(lambda _m, a: jacobians.append(a[0]))
    fit = trainer(1, max_steps=2)
    fit.fit(module, data())

    expected = gramian_diagnostics(jacobians[-1] @ jacobians[-1].T)
    assert float(fit.callback_metrics["diagnostics/conflict_ratio"]) == pytest.approx(
        float(expected.conflict_ratio)
    )
    assert float(fit.callback_metrics["diagnostics/norm_ratio"]) == pytest.approx(
        float(expected.norm_ratio), rel=1e-5
    )


class ShiftingTasks(Model):
    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Any:
        losses, _ = self.task_losses(batch)
        return {name: losses[name] for name in NAMES[: 2 + batch_idx % 2]}


def test_tasks_that_change_within_an_optimizer_step_are_refused() -> None:
    with pytest.raises(ValueError, match="tasks changed within one optimizer step"):
        trainer(1, accumulate_grad_batches=2).fit(ShiftingTasks("mean"), data())
    trainer(1).fit(ShiftingTasks("mean"), data())  # from one step to the next, they may change
