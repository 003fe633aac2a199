from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from golden_pendulum import GoldenPendulumMTL
from golden_pendulum.pro import DiagnosticsEngine
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.testing import assert_close
from torch.utils.tensorboard import SummaryWriter
from torchjd.aggregation import TrimmedMean, UPGrad
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import ExcessMTL, GoldenPendulum, WeightLogger, gramian_diagnostics

from .._asserts import COPY_WAYS, copy_of
from .._devices import host_synchronisation_is_an_error, requires_cuda
from .._inputs import conflicting_jacobian


def _linear_model(jacobian: torch.Tensor) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A model with one parameter vector and losses whose gradients are the rows of J."""

    parameter = nn.Parameter(torch.zeros(jacobian.shape[1], dtype=jacobian.dtype))
    model = nn.Module()
    model.parameter = parameter
    return model, {f"t{k}": row @ parameter for k, row in enumerate(jacobian)}


def test_diagnostics_match_the_reference_report() -> None:
    """The DiagnosticsEngine of golden-pendulum-mtl, on a model whose task gradients are J."""

    jacobian = conflicting_jacobian(5, 40, seed=3, decades=3.0, dtype=torch.float32)
    model, losses = _linear_model(jacobian)
    report = DiagnosticsEngine().analyze(losses, model)

    ours = gramian_diagnostics(jacobian @ jacobian.T)

    assert float(ours.conflict_ratio) == pytest.approx(report.conflict_ratio, abs=1e-4)
    assert float(ours.norm_ratio) == pytest.approx(report.norm_ratio, rel=1e-4)
    assert ours.norms.tolist() == pytest.approx(list(report.gradient_norms.values()), rel=1e-5)
    expected_pairs = [(int(i[1:]), int(j[1:]), cosine) for i, j, cosine in report.conflict_pairs]
    pairs = ours.conflicting_pairs()
    assert [(i, j) for i, j, _ in pairs] == [(i, j) for i, j, _ in expected_pairs]
    assert [c for _, _, c in pairs] == pytest.approx([c for _, _, c in expected_pairs], abs=1e-4)
    # By name, the pairs and norms read as the reference's.
    named = ours.as_dict(tasks=list(losses))
    assert [(i, j) for i, j, _ in named["conflicting_pairs"]] == [
        (i, j) for i, j, _ in report.conflict_pairs
    ]
    assert named["gradient_norms"] == pytest.approx(report.gradient_norms, rel=1e-5)


def test_diagnostics_by_hand_and_balance_ratio() -> None:
    jacobian = torch.tensor([[3.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])
    report = gramian_diagnostics(jacobian @ jacobian.T, weights=torch.tensor([0.2, 0.5, 0.3]))
    assert_close(
        report.cosine, torch.tensor([[1.0, -(0.5**0.5), 0.0], [-(0.5**0.5), 1.0, 0.0], [0.0] * 3])
    )
    assert float(report.conflict_ratio) == pytest.approx(1 / 3)
    assert float(report.norm_ratio) == pytest.approx(3.0 / 1e-10)  # a zero row
    assert float(report.balance_ratio) == pytest.approx(0.4)  # type: ignore[arg-type]
    assert report.as_dict()["conflicting_pairs"] == [(0, 1, pytest.approx(-(0.5**0.5)))]


def test_diagnostics_stay_on_the_device() -> None:
    gramian = torch.eye(3, device="meta")  # no values: any host read would fail
    report = gramian_diagnostics(gramian, weights=torch.ones(3, device="meta"))
    for value in (report.cosine, report.conflict_ratio, report.norm_ratio, report.balance_ratio):
        assert value is not None
        assert value.device.type == "meta"


_JACOBIAN = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    ("gramian", "weights", "message"),
    [
        # A Jacobian instead of its Gramian: used to fail with "The size of tensor a (3) ...".
        (_JACOBIAN, None, r"`gramian` must be a square m x m matrix .* Found shape \(2, 3\)"),
        (torch.ones(3), None, r"`gramian` must be a square"),
        (torch.zeros(0, 0), None, r"`gramian` must be a square"),
        (torch.eye(2, dtype=torch.int64), None, r"`gramian` must be floating-point"),
        # Square but not a Gramian: used to give a report without a word.
        (torch.tensor([[1.0, -0.5], [0.5, 1.0]]), None, r"`gramian` is not symmetric"),
        (torch.tensor([[1.0, 0.0], [0.0, -1.0]]), None, r"`gramian` has a negative diagonal"),
        # Weights of the wrong length: used to be accepted.
        (_JACOBIAN @ _JACOBIAN.T, torch.ones(3), r"`weights` must hold one weight per task"),
        (_JACOBIAN @ _JACOBIAN.T, torch.ones(1, 2), r"`weights` must hold one weight per task"),
    ],
)
def test_diagnostics_name_what_is_not_a_gramian(
    gramian: torch.Tensor, weights: torch.Tensor | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        gramian_diagnostics(gramian, weights)


def test_diagnostics_reject_a_non_tensor() -> None:
    with pytest.raises(TypeError, match="`gramian` must be a tensor"):
        gramian_diagnostics([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`weights` must be a tensor"):
        gramian_diagnostics(torch.eye(2), [0.5, 0.5])  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagnostics_accept_the_rounding_of_real_gramians(dtype: torch.dtype) -> None:
    """``J @ J.T`` of a wide Jacobian is symmetric up to rounding only: no false alarm."""

    jacobian = conflicting_jacobian(16, 200_000, seed=1, decades=4.0, dtype=dtype)
    gramian = jacobian @ jacobian.T
    report = gramian_diagnostics(gramian)
    assert_close(report.norms, jacobian.norm(dim=1), rtol=1e-4, atol=0.0)


def test_a_non_finite_gramian_gives_a_non_finite_report() -> None:
    gramian = torch.tensor([[math.nan, 1.0], [1.0, 2.0]])  # an overflow step: no error
    assert math.isnan(float(gramian_diagnostics(gramian).norm_ratio))


@requires_cuda
def test_on_an_accelerator_a_non_gramian_gives_nan_without_a_sync() -> None:
    not_a_gramian = torch.tensor([[1.0, -0.5], [0.5, 1.0]], device="cuda")
    gramian = _JACOBIAN.cuda() @ _JACOBIAN.cuda().T
    with host_synchronisation_is_an_error():
        bad, good = gramian_diagnostics(not_a_gramian), gramian_diagnostics(gramian)
    assert bad.cosine.isnan().all()
    assert math.isnan(float(bad.conflict_ratio))
    assert float(good.conflict_ratio) == pytest.approx(1.0)
    on_cpu = gramian_diagnostics(_JACOBIAN @ _JACOBIAN.T)
    assert_close(good.cosine.cpu(), on_cpu.cosine)
    assert_close(good.norms.cpu(), on_cpu.norms)


def _train(aggregator: nn.Module, steps: int, jacobian: torch.Tensor | None = None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for _ in range(steps):
        losses = ((model(torch.randn(16, 4)) - torch.randn(16, 3)) ** 2).mean(dim=0)
        backward(losses)
        jac_to_grad(model.parameters(), aggregator)
        model.zero_grad()


def _records(path: Path) -> list[dict]:  # type: ignore[type-arg]
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("make", "hooked"),
    [
        (GoldenPendulum, lambda a: a.gramian_weighting),
        (ExcessMTL, lambda a: a.weighting),  # a weighting of the Jacobian
        (UPGrad, lambda a: a.gramian_weighting),  # any torchjd weighting
    ],
    ids=["GoldenPendulum", "ExcessMTL", "UPGrad"],
)
def test_the_logger_writes_json_lines_of_any_weighting(make, hooked, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    aggregator = make()
    seen = []
    hooked(aggregator).register_forward_hook(lambda _m, _i, weights: seen.append(weights.tolist()))
    with WeightLogger(tmp_path / "weights.jsonl", every=2, diagnostics=True) as logger:
        logger.attach(aggregator)
        _train(aggregator, steps=5)

    records = _records(tmp_path / "weights.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    for record in records:
        assert list(record["weights"]) == ["task_0", "task_1", "task_2"]
        assert list(record["weights"].values()) == pytest.approx(seen[record["step"]])
        weights = list(record["weights"].values())
        assert record["balance_ratio"] == pytest.approx(min(weights) / max(weights))
        assert 0.0 <= record["conflict_ratio"] <= 1.0
        assert list(record["gradient_norms"]) == ["task_0", "task_1", "task_2"]
        assert record["method"] == str(hooked(aggregator))
        assert ("alpha" in record) == (make is GoldenPendulum)


def test_the_logger_names_the_tasks(tmp_path: Path) -> None:
    names = ["depth", "segmentation", "normals"]
    aggregator = GoldenPendulum()
    with WeightLogger(tmp_path / "given.jsonl", tasks=names) as given:
        given.attach(aggregator)
        _train(aggregator, steps=1)
    assert list(_records(tmp_path / "given.jsonl")[0]["weights"]) == names

    # Without names of its own, the logger reads the weighting's `tasks` (the core's contract).
    aggregator = GoldenPendulum()
    aggregator.gramian_weighting.tasks = ["a", "b", "c"]
    with WeightLogger(tmp_path / "read.jsonl", diagnostics=True) as read:
        read.attach(aggregator)
        _train(aggregator, steps=1)
    record = _records(tmp_path / "read.jsonl")[0]
    assert list(record["weights"]) == list(record["alpha"]) == ["a", "b", "c"]
    assert all(isinstance(i, str) for i, _, _ in record["conflicting_pairs"])


def test_the_logger_rejects_names_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct names"):
        WeightLogger(tasks=["a", "a"])
    with pytest.raises(ValueError, match="distinct names"):
        WeightLogger(tasks="ab")  # type: ignore[arg-type]
    aggregator = GoldenPendulum()
    WeightLogger(tmp_path / "w.jsonl", tasks=["a", "b"]).attach(aggregator)
    with pytest.raises(ValueError, match="`tasks` names 2 tasks, but there are 3 weights"):
        _train(aggregator, steps=1)


def test_the_logger_refuses_names_equal_as_text(tmp_path: Path) -> None:
    """1 and "1" would share the key "1" of a JSON line, and one weight would be lost."""

    message = r"The task names 1 and '1' both read '1' as text"
    with pytest.raises(ValueError, match=message):
        WeightLogger(tmp_path / "w.jsonl", tasks=[1, "1", "b"])
    aggregator = GoldenPendulum()
    aggregator.tasks = [1, "1", "b"]  # distinct names for the aggregator: the logger refuses
    WeightLogger(tmp_path / "w.jsonl").attach(aggregator)
    with pytest.raises(ValueError, match=message):
        _train(aggregator, steps=1)
    assert not (tmp_path / "w.jsonl").exists()


def test_a_closed_logger_refuses_to_log(tmp_path: Path) -> None:
    aggregator = GoldenPendulum()
    with WeightLogger(tmp_path / "w.jsonl") as logger:
        handle = logger.attach(aggregator)
        _train(aggregator, steps=2)
    with pytest.raises(ValueError, match=r"WeightLogger is closed.*handle.remove\(\)"):
        _train(aggregator, steps=1)
    assert [r["step"] for r in _records(tmp_path / "w.jsonl")] == [0, 1]
    handle.remove()
    _train(aggregator, steps=1)  # detached: the aggregator trains on


def test_the_logger_reports_golden_pendulum_alpha_as_the_reference_does(tmp_path: Path) -> None:
    """
    golden-pendulum-mtl reports the QP solution as its weights, and their balance: the logger
    gives both next to the weights on the rows of J (which also hold the inverse norms).
    """

    jacobian = conflicting_jacobian(4, 30, seed=5, decades=2.5)
    model, losses = _linear_model(jacobian)
    reference = GoldenPendulumMTL()
    expected = reference.backward(losses, model)

    aggregator = GoldenPendulum()
    with WeightLogger(tmp_path / "w.jsonl", tasks=list(losses)) as logger:
        logger.attach(aggregator)
        aggregator(jacobian)
    record = _records(tmp_path / "w.jsonl")[0]

    assert record["alpha"] == pytest.approx(expected, rel=1e-6)
    assert record["alpha_balance_ratio"] == pytest.approx(reference.weight_balance_ratio, 1e-6)
    assert record["balance_ratio"] < 0.5 * record["alpha_balance_ratio"]  # not the same number


def test_the_logger_writes_strict_json_for_an_overflow_step(tmp_path: Path) -> None:
    aggregator = GoldenPendulum()
    jacobian = torch.tensor([[1.0, math.inf], [0.0, 1.0]])  # an AMP overflow step
    with WeightLogger(tmp_path / "w.jsonl", diagnostics=True) as logger:
        logger.attach(aggregator)
        aggregator(jacobian)
    text = (tmp_path / "w.jsonl").read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    record = _records(tmp_path / "w.jsonl")[0]
    assert record["weights"] == {"task_0": None, "task_1": None}
    assert record["balance_ratio"] is None


def test_the_logger_writes_tensorboard_scalars(tmp_path: Path) -> None:
    aggregator = GoldenPendulum()
    seen = []
    aggregator.gramian_weighting.register_forward_hook(lambda _m, _i, w: seen.append(w.tolist()))
    logger = WeightLogger(tensorboard_dir=tmp_path, tag="gp", tasks=["a", "b", "c"])
    logger.attach(aggregator)
    _train(aggregator, steps=4)
    logger.close()

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    expected = {"gp/weight_a", "gp/weight_c", "gp/balance_ratio", "gp/alpha_b"}
    assert expected | {"gp/alpha_balance_ratio"} <= set(tags)
    logged = [event.value for event in events.Scalars("gp/weight_b")]
    assert logged == pytest.approx([weights[1] for weights in seen])
    assert [event.step for event in events.Scalars("gp/weight_b")] == [0, 1, 2, 3]


def test_the_logger_accepts_an_existing_writer(tmp_path: Path) -> None:
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        logger = WeightLogger(writer=writer)
        aggregator = GoldenPendulum()
        logger.attach(aggregator)
        _train(aggregator, steps=2)
        logger.close()  # leaves the caller's writer open
        writer.add_scalar("after", 1.0, 0)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "weights/weight_task_0" in events.Tags()["scalars"]


def test_a_module_carrying_the_logger_deep_copies(tmp_path: Path) -> None:
    """The copy logs to the same files, with its own handle; the original keeps logging."""

    aggregator = GoldenPendulum()
    logger = WeightLogger(tmp_path / "w.jsonl", tensorboard_dir=tmp_path / "tb")
    logger.attach(aggregator)
    _train(aggregator, steps=1)

    twin = copy.deepcopy(aggregator)
    _train(twin, steps=1)
    _train(aggregator, steps=1)
    logger.close()
    (twin_logger,) = twin.gramian_weighting._forward_hooks.values()
    twin_logger.close()

    assert twin_logger is not logger
    assert [r["step"] for r in _records(tmp_path / "w.jsonl")] == [0, 1, 1]


@pytest.mark.parametrize("how", COPY_WAYS)
def test_a_module_carrying_the_logger_pickles(tmp_path: Path, how: str) -> None:
    """The copy's logger continues the step count into the same file, with its own handle."""

    aggregator = GoldenPendulum()
    logger = WeightLogger(tmp_path / "w.jsonl", tasks=["a", "b", "c"])
    logger.attach(aggregator)
    _train(aggregator, steps=2)
    twin = copy_of(aggregator, how)
    (twin_logger,) = twin.gramian_weighting._forward_hooks.values()
    assert twin_logger is not logger
    _train(twin, steps=1)
    twin_logger.close()
    logger.close()
    records = _records(tmp_path / "w.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert list(records[-1]["weights"]) == ["a", "b", "c"]


def test_the_logger_names_the_extra_when_tensorboard_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'torchjd-golden\[tensorboard\]'"):
        WeightLogger(tensorboard_dir=tmp_path)
    WeightLogger(tmp_path / "w.jsonl")  # JSON lines alone need nothing


def test_the_logger_needs_an_aggregator_with_weights() -> None:
    with pytest.raises(TypeError, match="`TrimmedMean` does not combine the rows with a weighting"):
        WeightLogger().attach(TrimmedMean(trim_number=1))


@pytest.mark.parametrize("every", [0, -1, 1.5])
def test_the_logger_rejects_a_bad_period(every: object) -> None:
    with pytest.raises(ValueError, match="every"):
        WeightLogger(every=every)  # type: ignore[arg-type]
