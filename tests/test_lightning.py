"""A stateful aggregator inside a LightningModule resumes from Lightning's checkpoint exactly."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Lightning's own deprecation notices and hints (not about this package).
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_resume.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightning_resume", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("aggregator", "state_key"),
    [
        ("gcond", "aggregator.weighting.previous_jacobian"),
        ("excess_mtl", "aggregator.weighting.sq_grad_sum"),
        ("gaba", "aggregator.gramian_weighting.ema_weights"),
    ],
)
def test_a_resumed_run_continues_identically(
    aggregator: str, state_key: str, tmp_path: Path
) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    example = _example()

    uninterrupted, resumed, checkpoint = example.uninterrupted_and_resumed(aggregator, 4, tmp_path)

    for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert state_key in checkpoint["state_dict"]
    for key, value in uninterrupted.aggregator.state_dict().items():
        assert torch.equal(value, resumed.aggregator.state_dict()[key]), key
    step_count = next(v for k, v in checkpoint["state_dict"].items() if k.endswith("step_count"))
    assert int(step_count) == 20  # two epochs of ten batches before the checkpoint
