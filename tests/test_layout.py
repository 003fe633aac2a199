"""
The package's layout keeps its promises: every public name of the release before the subpackages
is still importable from where it was, and no module is longer than a reader takes in at one
sitting. (The layers and the absence of import cycles are import-linter's contracts, in
``pyproject.toml``, which CI checks with ``lint-imports``.)
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import torchjd_golden
import torchjd_golden.huggingface
import torchjd_golden.integrations.huggingface
import torchjd_golden.integrations.lightning
import torchjd_golden.lightning

PACKAGE = Path(torchjd_golden.__file__).parent

# Every public module of torchjd-golden before the subpackages (main at 088b96f) and the names it
# exported (its __all__, or what it defined where it had none).
PUBLIC_NAMES_BEFORE_THE_SUBPACKAGES: dict[str, tuple[str, ...]] = {
    "torchjd_golden": (
        "GABA",
        "PHI",
        "AdaptiveGoldenPendulum",
        "AdaptiveGoldenPendulumWeighting",
        "ConflictMonitor",
        "ConflictReport",
        "Curriculum",
        "DynamicK",
        "DynamicKWeighting",
        "ExcessMTL",
        "ExcessMTLWeighting",
        "GABAWeighting",
        "GCond",
        "GCondStatistics",
        "GCondWeighting",
        "GoldenPendulum",
        "GoldenPendulumWeighting",
        "GramianDiagnostics",
        "Phase",
        "Preset",
        "TaskGroup",
        "WeightLogger",
        "aggregator_from_config",
        "available_names",
        "backward_task",
        "get_preset",
        "golden_ratio_weights",
        "gramian_diagnostics",
        "list_presets",
        "sharded_jac_to_grad",
        "sync_jacobians",
        "weighting_from_config",
        "with_grad_scaler",
        "__version__",
    ),
    "torchjd_golden.compare": ("main",),
    "torchjd_golden.lightning": ("MultiTaskModule", "TaskLosses"),
    "torchjd_golden.huggingface": ("AGGREGATOR_STATE_NAME", "MultiTaskTrainer", "TaskLosses"),
    "torchjd_golden.golden_pendulum": (
        "PHI",
        "GoldenPendulumCallback",
        "GoldenPendulumMTL",
        "WeightLogger",
        "golden_nash_backward",
        "golden_ratio_weights",
    ),
    "torchjd_golden.golden_pendulum.callbacks": ("GoldenPendulumCallback", "WeightLogger"),
    "torchjd_golden.golden_pendulum.core": (
        "PHI",
        "GoldenPendulumMTL",
        "golden_nash_backward",
        "golden_ratio_weights",
    ),
    "torchjd_golden.golden_pendulum.pro": (
        "AdaptiveLambda",
        "ConflictReport",
        "CurriculumScheduler",
        "DiagnosticsEngine",
        "DynamicK",
        "FinancePreset",
        "Phase",
        "TaskGroup",
        "get_preset",
        "list_presets",
    ),
    "torchjd_golden.golden_pendulum.pro.adaptive": ("AdaptiveLambda",),
    "torchjd_golden.golden_pendulum.pro.curriculum": ("CurriculumScheduler",),
    "torchjd_golden.golden_pendulum.pro.diagnostics": ("DiagnosticsEngine",),
    "torchjd_golden.golden_pendulum.pro.dynamic_k": ("DynamicK", "TaskGroup"),
    "torchjd_golden.golden_pendulum.pro.presets": ("FinancePreset", "get_preset", "list_presets"),
}

# The subpackages, each with its public names documented on its API page.
SUBPACKAGES = (
    "aggregation",
    "step",
    "monitoring",
    "schedule",
    "config",
    "integrations",
    "golden_pendulum",
    "compare",
)
API_PAGES = {"golden_pendulum": "drop_in"}  # where the page is not named after the subpackage
DOCS = Path(__file__).resolve().parents[1] / "docs"
MAX_LINES = 400


@pytest.mark.parametrize("module_name", PUBLIC_NAMES_BEFORE_THE_SUBPACKAGES)
def test_the_public_names_of_the_release_before_still_import(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = PUBLIC_NAMES_BEFORE_THE_SUBPACKAGES[module_name]
    assert [name for name in names if not hasattr(module, name)] == []


def test_the_top_level_names_are_the_subpackages_objects() -> None:
    """
    Each is the public name of one of the library's layers (the same object): the top level only
    re-exports. (The drop-in mirrors golden-pendulum-mtl's names, PHI among them.)
    """

    library = ("aggregation", "step", "monitoring", "schedule", "config")
    subpackages = [importlib.import_module(f"torchjd_golden.{name}") for name in library]
    for name in torchjd_golden.__all__:
        value = getattr(torchjd_golden, name)
        owners = [
            module.__name__
            for module in subpackages
            if name in getattr(module, "__all__", ()) and getattr(module, name) is value
        ]
        assert len(owners) == 1, (name, owners)


def test_the_earlier_trainer_modules_are_the_integrations() -> None:
    for old, new in [
        (torchjd_golden.lightning, torchjd_golden.integrations.lightning),
        (torchjd_golden.huggingface, torchjd_golden.integrations.huggingface),
    ]:
        assert old.__all__ == new.__all__
        assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)


def _api_text(page: str) -> str:
    """An API page, and the pages of its toctree."""

    path = DOCS / "api" / f"{page}.rst"
    text = path.read_text()
    for block in re.findall(r"^\.\. toctree::\n(?:    :.*\n)*\n((?:    \S.*\n)+)", text, re.M):
        for child in block.split():
            text += (path.parent / f"{child}.rst").read_text()
    return text


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_has_an_api_page_with_its_public_names(name: str) -> None:
    module = importlib.import_module(f"torchjd_golden.{name}")
    assert module.__doc__
    text = _api_text(API_PAGES.get(name, name))
    assert f".. automodule:: torchjd_golden.{name}\n" in text
    documented = set(re.findall(r"^\.\. auto\w+:: ([\w.]+)$", text, re.M))
    undocumented = [
        member
        for member in getattr(module, "__all__", ())
        if not documented & {f"torchjd_golden.{member}", f"torchjd_golden.{name}.{member}"}
    ]
    assert undocumented == []


def test_no_module_is_longer_than_a_sitting() -> None:
    lengths = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(lengths) > 50
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}
