from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
import torch
import torchjd.aggregation as torchjd_aggregation
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator

import torchjd_golden
from torchjd_golden import (
    GABA,
    ExcessMTL,
    GCond,
    GoldenPendulum,
    GoldenPendulumWeighting,
    aggregator_from_config,
    available_names,
    weighting_from_config,
)
from torchjd_golden import (
    config as config_module,
)

from ._methods import AGGREGATORS

ROOT = Path(__file__).resolve().parents[1]

OUR_AGGREGATORS = sorted({method.factory.__name__ for method in AGGREGATORS})
TORCHJD_AGGREGATORS = [
    name
    for name in torchjd_aggregation.__all__
    if isinstance(getattr(torchjd_aggregation, name), type)
    and issubclass(getattr(torchjd_aggregation, name), Aggregator)
    and getattr(torchjd_aggregation, name)
    not in {Aggregator, WeightedAggregator, GramianWeightedAggregator}
]
# Constructor arguments torchjd requires, and the optional packages some classes need.
REQUIRED = {
    "CAGrad": {"c": 0.5},
    "Constant": {"weights": [0.5, 0.5]},
    "FairGrad": {"alpha": 1.0},
    "Krum": {"n_byzantine": 1},
    "NashMTL": {"n_tasks": 2},
    "TrimmedMean": {"trim_number": 1},
}


NEEDS_MISSING_PACKAGES = {
    name
    for name, package in (("CAGrad", "cvxpy"), ("NashMTL", "cvxpy"), ("FairGrad", "scipy"))
    if importlib.util.find_spec(package) is None
}


def _spellings(name: str) -> list[str]:
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
    return [name, name.lower(), name.upper(), snake, snake.replace("_", "-")]


@pytest.mark.parametrize("name", OUR_AGGREGATORS)
def test_our_aggregators_by_any_spelling(name: str) -> None:
    expected = getattr(torchjd_golden, name)
    for spelling in [*_spellings(name), f"torchjd_golden.{name}"]:
        assert type(aggregator_from_config(spelling)) is expected, spelling


@pytest.mark.parametrize("name", TORCHJD_AGGREGATORS)
def test_every_torchjd_aggregator_by_name(name: str) -> None:
    expected = getattr(torchjd_aggregation, name)
    if name == "ExcessMTL":  # ours shadows it; the qualified name gives torchjd's
        assert type(aggregator_from_config("torchjd.ExcessMTL")) is expected
        return
    spec = {"name": name.lower(), **REQUIRED.get(name, {})}
    if name in NEEDS_MISSING_PACKAGES:  # found, but torchjd's optional dependency is absent
        with pytest.raises(ImportError, match=name):
            aggregator_from_config(spec)
        return
    assert type(aggregator_from_config(spec)) is expected
    assert name in available_names()


def test_keyword_arguments_reach_the_constructor() -> None:
    aggregator = aggregator_from_config({"name": "golden_pendulum", "lam": 0.3, "pcgrad": False})
    assert repr(aggregator) == repr(GoldenPendulum(lam=0.3, pcgrad=False))
    gcond = aggregator_from_config({"name": "GCond", "conflict_thresholds": [-0.9, -0.6, -0.1]})
    assert isinstance(gcond, GCond)
    assert gcond.conflict_thresholds == (-0.9, -0.6, -0.1)


def test_lists_become_tensors_and_mappings_weightings() -> None:
    upgrad = aggregator_from_config({"name": "UPGrad", "pref_vector": [1.0, 2.0]})
    assert torch.equal(upgrad.pref_vector, torch.tensor([1.0, 2.0]))  # type: ignore[union-attr]
    constant = aggregator_from_config({"name": "constant", "weights": [0.25, 0.75]})
    assert torch.equal(constant(torch.eye(2)), torch.tensor([0.25, 0.75]))
    smoothed = weighting_from_config({"name": "cr_mogm", "weighting": "golden_pendulum"})
    assert isinstance(smoothed.weighting, GoldenPendulumWeighting)  # type: ignore[attr-defined]


def test_weightings_by_method_or_class_name() -> None:
    assert type(weighting_from_config("golden_pendulum")) is GoldenPendulumWeighting
    assert type(weighting_from_config("GoldenPendulumWeighting")) is GoldenPendulumWeighting
    assert type(weighting_from_config({"name": "upgrad"})).__name__ == "UPGradWeighting"
    assert "GABAWeighting" in available_names("weighting")


def test_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="Unknown aggregator 'golden_pendullum'") as info:
        aggregator_from_config("golden_pendullum")
    for name in [
        "GoldenPendulum",
        "GCond",
        "UPGrad",
        "MGDA",
        "Mean",
        "PCGrad",
        "torchjd.ExcessMTL",
    ]:
        assert name in str(info.value)


def test_an_unknown_keyword_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown keyword\(s\) 'bta' for GABA") as info:
        aggregator_from_config({"name": "gaba", "bta": 0.9})
    assert "beta, warmup_steps, min_weight" in str(info.value)


def test_bad_values_are_rejected_by_the_setters() -> None:
    with pytest.raises(ValueError, match="`lam`"):
        aggregator_from_config({"name": "golden_pendulum", "lam": -1.0})


@pytest.mark.parametrize(
    "spec", [3, None, {"lam": 1.0}, {"name": 1}, {"name": "gaba", "_target_": "x"}]
)
def test_malformed_specs(spec: object) -> None:
    with pytest.raises(ValueError, match="must be a name, or a mapping"):
        aggregator_from_config(spec)


def test_yaml_json_files_and_paths(tmp_path: Path) -> None:
    spec = {"name": "excess_mtl", "robust_step_size": 0.5, "n_warmup_steps": 3}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "b.json").write_text(json.dumps(spec))
    (tmp_path / "c.yml").write_text("gaba\n")
    for path in (str(tmp_path / "a.yaml"), tmp_path / "b.json"):
        aggregator = aggregator_from_config(path)
        assert isinstance(aggregator, ExcessMTL)
        assert (aggregator.robust_step_size, aggregator.n_warmup_steps) == (0.5, 3)
    assert isinstance(aggregator_from_config(tmp_path / "c.yml"), GABA)
    with pytest.raises(ValueError, match="does not exist"):
        aggregator_from_config(tmp_path / "missing.yaml")


def test_omegaconf_nodes() -> None:
    config = OmegaConf.create({"aggregator": {"name": "gcond", "tie_breaking_weights": [0.0, 1.0]}})
    aggregator = aggregator_from_config(config.aggregator)
    assert isinstance(aggregator, GCond)
    assert aggregator.tie_breaking_weights == (0.0, 1.0)


def test_hydra_instantiate_with_target() -> None:
    config = OmegaConf.create(
        {
            "_target_": "torchjd_golden.GCond",
            "conflict_thresholds": [-0.9, -0.6, -0.1],
            "norm_cap": 2.0,
            "momentum_beta": 0.5,
        }
    )
    aggregator = instantiate(config)
    assert isinstance(aggregator, GCond)
    assert aggregator.conflict_thresholds == (-0.9, -0.6, -0.1)
    assert (aggregator.norm_cap, aggregator.momentum_beta) == (2.0, 0.5)
    assert repr(aggregator_from_config(config)) == repr(aggregator)  # the same config works here


def test_entry_points_register_our_classes() -> None:
    points = {point.name: point for point in entry_points(group=config_module.ENTRY_POINT_GROUP)}
    for name in [*OUR_AGGREGATORS, "GoldenPendulumWeighting", "GCondWeighting"]:
        assert points[name].load() is getattr(torchjd_golden, name)


class _PluginAggregator(torchjd_aggregation.Mean):
    """An aggregator another package would register."""


def test_plugins_registered_by_other_packages_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = EntryPoint(
        "MyPlugin", f"{__name__}:_PluginAggregator", config_module.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(config_module, "entry_points", lambda group: [plugin])
    config_module._registry.cache_clear()
    try:
        assert type(aggregator_from_config("my_plugin")) is _PluginAggregator
        assert "MyPlugin" in available_names()
    finally:
        config_module._registry.cache_clear()


def test_one_training_script_swaps_methods_by_one_config_line(tmp_path: Path) -> None:
    base = (ROOT / "examples" / "configs" / "golden_pendulum.yaml").read_text()
    swapped = base.replace("aggregator: {name: golden_pendulum, lam: 0.5}", "aggregator: upgrad")
    assert len(set(base.splitlines()) ^ set(swapped.splitlines())) == 2  # one line changed
    outputs = []
    for name, text in (("golden.yaml", base), ("upgrad.yaml", swapped)):
        (tmp_path / name).write_text(text)
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "config_swap.py"), str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        outputs.append(result.stdout)
    assert "aggregator: GoldenPendulum(lam=0.5" in outputs[0]
    assert "aggregator: UPGrad(" in outputs[1]
    for output in outputs:
        first, last = (float(v) for v in output.split("total loss: ")[1].split(" -> "))
        assert last < 0.1 * first


@pytest.mark.parametrize("text", ["1e-8", "1E-8", "+1e-8", "2.5e3", "1.0e-8"])
def test_yaml_reads_exponent_floats_without_a_decimal_point(tmp_path: Path, text: str) -> None:
    """PyYAML (YAML 1.1) reads 1e-8 as a string: GCond's own default eps would be refused."""

    path = tmp_path / "gcond.yaml"
    path.write_text(f"name: gcond\neps: {text}\n")
    assert aggregator_from_config(path).eps == float(text)


def test_a_numeric_string_for_a_real_parameter_says_how_to_write_it() -> None:
    with pytest.raises(ValueError, match=r"`eps` must be a number, not the string '1e-8'.*1\.0e-8"):
        aggregator_from_config({"name": "gcond", "eps": "1e-8"})


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("gabaa", "gaba"),
        ("GAB", "GABA"),
        ("golden_pendulm", "golden_pendulum"),
        ("GoldenPendulm", "GoldenPendulum"),
        ("excess_mt", "excess_mtl"),
        ("upgard", "upgrad"),
    ],
)
def test_a_typo_gets_the_closest_name_in_the_users_spelling(typo: str, suggestion: str) -> None:
    expected = f"Unknown aggregator '{typo}'. Did you mean '{suggestion}'?"
    with pytest.raises(ValueError, match=re.escape(expected)):
        aggregator_from_config(typo)


def test_a_name_far_from_any_gets_no_suggestion() -> None:
    with pytest.raises(ValueError, match=r"Unknown weighting 'zzzzzzzz'\. Valid names") as info:
        weighting_from_config("zzzzzzzz")
    assert "Did you mean" not in str(info.value)


def test_an_unknown_kind_is_named() -> None:
    with pytest.raises(ValueError, match=r"Unknown kind 'aggregatorz'.*aggregator.*weighting"):
        available_names("aggregatorz")  # type: ignore[arg-type]


def test_the_message_for_a_malformed_config_reads_well() -> None:
    with pytest.raises(ValueError, match=r"^An aggregator config must be"):
        aggregator_from_config(3)
    with pytest.raises(ValueError, match=r"^A weighting config must be"):
        weighting_from_config([1])
