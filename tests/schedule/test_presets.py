from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchjd_golden import (
    DynamicK,
    GoldenPendulum,
    GoldenPendulumWeighting,
    Preset,
    aggregator_from_config,
    get_preset,
    list_presets,
    weighting_from_config,
)

NAMES = ["finance_4phase", "finance_quick", "nlp_multitask", "vision_multitask", "robotics_control"]


def test_the_five_presets() -> None:
    assert list(list_presets()) == NAMES
    for name in NAMES:
        preset = get_preset(name)
        assert isinstance(preset, Preset)
        assert preset.name == name
        assert preset.description == list_presets()[name]
        assert preset.total_steps == sum(phase.steps for phase in preset.phases)


def test_get_preset_returns_a_copy() -> None:
    preset = get_preset("vision_multitask")
    preset.phases[0].tasks.add("extra")  # type: ignore[attr-defined]
    preset.phases[1].lam = 9.0
    fresh = get_preset("vision_multitask")
    assert "extra" not in fresh.phases[0].tasks
    assert "extra" not in fresh.phases[1].tasks
    assert fresh.phases[1].lam == 0.3


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match=r"Unknown preset 'nope'\. Available: finance_4phase"):
        get_preset("nope")


def test_config_builds_the_aggregator_of_a_phase(tmp_path: Path) -> None:
    aggregator = aggregator_from_config({"preset": "robotics_control"})
    assert repr(aggregator) == repr(GoldenPendulum(lam=0.7))
    aggregator = aggregator_from_config({"preset": "finance_4phase", "phase": "D_discovery"})
    assert repr(aggregator) == repr(GoldenPendulum(lam=0.8))
    aggregator = aggregator_from_config(
        {"preset": "vision_multitask", "phase": "refine", "name": "dynamic_k", "n_iter": 10}
    )
    assert isinstance(aggregator, DynamicK)
    assert (aggregator.lam, aggregator.n_iter) == (0.3, 10)
    weighting = weighting_from_config({"preset": "nlp_multitask", "pcgrad": False})
    assert repr(weighting) == repr(GoldenPendulumWeighting(lam=0.5, pcgrad=False))
    path = tmp_path / "method.json"
    path.write_text(json.dumps({"preset": "finance_quick", "phase": "B_meta"}))
    assert repr(aggregator_from_config(path)) == repr(GoldenPendulum(lam=0.4))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"preset": "finance_4phase"}, "needs a `phase` among 'A_ranking'"),
        ({"preset": "finance_quick", "phase": "Z"}, "Found phase='Z'"),
        ({"preset": "nope"}, "Unknown preset"),
    ],
)
def test_config_errors_are_named(spec: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregator_from_config(spec)
