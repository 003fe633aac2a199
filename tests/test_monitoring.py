from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_pendulum.pro import DiagnosticsEngine
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.testing import assert_close
from torch.utils.tensorboard import SummaryWriter
from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import GCond, GoldenPendulum, WeightLogger, gramian_diagnostics

from ._inputs import conflicting_jacobian


def test_diagnostics_match_the_reference_report() -> None:
    """The DiagnosticsEngine of golden-pendulum-mtl, on a model whose task gradients are J."""

    jacobian = conflicting_jacobian(5, 40, seed=3, decades=3.0, dtype=torch.float32)
    parameter = nn.Parameter(torch.zeros(40))
    model = nn.Module()
    model.parameter = parameter
    losses = {f"t{k}": row @ parameter for k, row in enumerate(jacobian)}
    report = DiagnosticsEngine().analyze(losses, model)

    ours = gramian_diagnostics(jacobian @ jacobian.T)

    assert float(ours.conflict_ratio) == pytest.approx(report.conflict_ratio, abs=1e-4)
    assert float(ours.norm_ratio) == pytest.approx(report.norm_ratio, rel=1e-4)
    assert ours.norms.tolist() == pytest.approx(list(report.gradient_norms.values()), rel=1e-5)
    expected_pairs = [(int(i[1:]), int(j[1:]), cosine) for i, j, cosine in report.conflict_pairs]
    pairs = ours.conflicting_pairs()
    assert [(i, j) for i, j, _ in pairs] == [(i, j) for i, j, _ in expected_pairs]
    assert [c for _, _, c in pairs] == pytest.approx([c for _, _, c in expected_pairs], abs=1e-4)


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


def _train(aggregator: nn.Module, steps: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for _ in range(steps):
        losses = ((model(torch.randn(16, 4)) - torch.randn(16, 3)) ** 2).mean(dim=0)
        backward(losses)
        jac_to_grad(model.parameters(), aggregator)
        model.zero_grad()


@pytest.mark.parametrize(
    ("make", "hooked"),
    [
        (GoldenPendulum, lambda a: a.gramian_weighting),
        (GCond, lambda a: a.weighting),
        (UPGrad, lambda a: a.gramian_weighting),  # any torchjd weighting
    ],
    ids=["GoldenPendulum", "GCond", "UPGrad"],
)
def test_the_logger_writes_json_lines_of_any_weighting(make, hooked, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    aggregator = make()
    seen = []
    hooked(aggregator).register_forward_hook(lambda _m, _i, weights: seen.append(weights.tolist()))
    with WeightLogger(tmp_path / "weights.jsonl", every=2, diagnostics=True) as logger:
        hooked(aggregator).register_forward_hook(logger)
        _train(aggregator, steps=5)

    records = [json.loads(line) for line in (tmp_path / "weights.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    for record in records:
        assert record["weights"] == pytest.approx(seen[record["step"]])
        assert record["balance_ratio"] == pytest.approx(
            min(record["weights"]) / max(record["weights"])
        )
        assert 0.0 <= record["conflict_ratio"] <= 1.0
        assert len(record["gradient_norms"]) == 3
        assert record["method"] == str(hooked(aggregator))


def test_the_logger_writes_tensorboard_scalars(tmp_path: Path) -> None:
    aggregator = GoldenPendulum()
    seen = []
    aggregator.gramian_weighting.register_forward_hook(lambda _m, _i, w: seen.append(w.tolist()))
    logger = WeightLogger(tensorboard_dir=tmp_path, tag="gp", diagnostics=True)
    aggregator.gramian_weighting.register_forward_hook(logger)
    _train(aggregator, steps=4)
    logger.close()

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"gp/weight_0", "gp/weight_2", "gp/balance_ratio", "gp/conflict_ratio"} <= set(tags)
    logged = [event.value for event in events.Scalars("gp/weight_1")]
    assert logged == pytest.approx([weights[1] for weights in seen])
    assert [event.step for event in events.Scalars("gp/weight_1")] == [0, 1, 2, 3]


def test_the_logger_accepts_an_existing_writer(tmp_path: Path) -> None:
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        logger = WeightLogger(writer=writer)
        aggregator = GoldenPendulum()
        aggregator.gramian_weighting.register_forward_hook(logger)
        _train(aggregator, steps=2)
        logger.close()  # leaves the caller's writer open
        writer.add_scalar("after", 1.0, 0)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "weights/weight_0" in events.Tags()["scalars"]


@pytest.mark.parametrize("every", [0, -1, 1.5])
def test_the_logger_rejects_a_bad_period(every: object) -> None:
    with pytest.raises(ValueError, match="every"):
        WeightLogger(every=every)  # type: ignore[arg-type]
