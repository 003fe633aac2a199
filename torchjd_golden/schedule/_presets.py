"""
The five presets of ``golden_pendulum.pro`` (``golden-pendulum-mtl`` 0.2.0), with the same
phases, for :class:`~torchjd_golden.Curriculum` and for the config functions.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._phase import Phase


@dataclass
class Preset:
    """
    A named set of curriculum phases and recommendations, with the fields of
    ``golden_pendulum.pro.FinancePreset``.

    :param name: The preset's name.
    :param description: What it is meant for.
    :param phases: Its phases, in order.
    :param total_steps: The number of steps of all phases.
    :param recommended_lr: The recommended base learning rate.
    :param recommended_batch_size: The recommended batch size.
    """

    name: str
    description: str
    phases: list[Phase] = field(default_factory=list)
    total_steps: int = 0
    recommended_lr: float = 1e-4
    recommended_batch_size: int = 64


_FINANCE_RANKING = {"horizon_returns", "trade_quality", "short_horizon_rank"}
_VISION_TASKS = {"segmentation", "depth", "surface_normals", "edge_detection"}

_PRESETS = {
    preset.name: preset
    for preset in (
        Preset(
            name="finance_4phase",
            description=(
                "Full 4-phase curriculum from the Golden Pendulum paper. "
                "Phase A: ranking (backbone unfrozen, 15K steps). "
                "Phase B: risk heads (frozen, 10K). "
                "Phase C: meta heads (frozen, 10K). "
                "Phase D: discovery (frozen, 5K). "
                "Total: 40K steps. Validated on 42.5M-param, 16-head transformer."
            ),
            phases=[
                Phase(
                    "A_ranking", _FINANCE_RANKING | {"embedding"}, 15000, lr=5e-5, warmup_steps=500
                ),
                Phase(
                    "B_risk",
                    {"vol_forecast", "mae", "kelly_fraction", "risk_score", "horizon_magnitude"},
                    10000,
                    freeze_backbone=True,
                    lam=0.3,
                    warmup_steps=200,
                ),
                Phase(
                    "C_meta",
                    {"regime", "calibration", "confidence", "optimal_exit"},
                    10000,
                    freeze_backbone=True,
                    lam=0.3,
                    warmup_steps=200,
                ),
                Phase(
                    "D_discovery",
                    {"reconstruction", "prediction", "decorrelation"},
                    5000,
                    freeze_backbone=True,
                    lam=0.8,
                    lr=5e-5,
                    warmup_steps=100,
                ),
            ],
            total_steps=40000,
            recommended_lr=5e-5,
        ),
        Preset(
            name="finance_quick",
            description=(
                "Abbreviated 2-phase curriculum for rapid iteration. "
                "Phase A: ranking + risk combined (backbone unfrozen, 8K steps). "
                "Phase B: meta + sizing (frozen, 5K steps). "
                "Total: 13K steps. Good for hyperparameter search."
            ),
            phases=[
                Phase(
                    "A_combined",
                    _FINANCE_RANKING | {"vol_forecast", "mae", "risk_score"},
                    8000,
                    lr=5e-5,
                    warmup_steps=300,
                ),
                Phase(
                    "B_meta",
                    {"regime", "calibration", "confidence", "kelly_fraction", "optimal_exit"},
                    5000,
                    freeze_backbone=True,
                    lam=0.4,
                    warmup_steps=100,
                ),
            ],
            total_steps=13000,
            recommended_lr=5e-5,
        ),
        Preset(
            name="nlp_multitask",
            description=(
                "Multi-task NLP training (classification + NER + similarity). "
                "Single phase, backbone unfrozen, moderate lambda. "
                "Good for BERT/GPT fine-tuning with 2-5 tasks."
            ),
            phases=[
                Phase(
                    "joint",
                    {"classification", "ner", "similarity", "qa", "summarization"},
                    20000,
                    lr=2e-5,
                    warmup_steps=1000,
                ),
            ],
            total_steps=20000,
            recommended_lr=2e-5,
            recommended_batch_size=32,
        ),
        Preset(
            name="vision_multitask",
            description=(
                "Multi-task vision (segmentation + depth + normals + edges). "
                "Two phases: joint training then head refinement. "
                "Based on NYUv2/Cityscapes multi-task benchmarks."
            ),
            phases=[
                Phase("joint", _VISION_TASKS, 30000, warmup_steps=1000),
                Phase(
                    "refine",
                    _VISION_TASKS,
                    10000,
                    freeze_backbone=True,
                    lam=0.3,
                    lr=1e-5,
                    warmup_steps=200,
                ),
            ],
            total_steps=40000,
            recommended_batch_size=16,
        ),
        Preset(
            name="robotics_control",
            description=(
                "Multi-objective robotic control (reward + safety + efficiency). "
                "Safety task gets higher lambda to prevent starvation. "
                "Single phase, backbone unfrozen."
            ),
            phases=[
                Phase(
                    "joint",
                    {"reward", "safety", "energy_efficiency", "smoothness"},
                    50000,
                    lam=0.7,
                    lr=3e-4,
                    warmup_steps=2000,
                ),
            ],
            total_steps=50000,
            recommended_lr=3e-4,
            recommended_batch_size=256,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """
    A copy of the preset ``name``: ``"finance_4phase"`` (the paper's four phases),
    ``"finance_quick"``, ``"nlp_multitask"``, ``"vision_multitask"`` or ``"robotics_control"``.

    >>> [(phase.name, phase.steps, phase.lam) for phase in get_preset("finance_quick").phases]
    [('A_combined', 8000, 0.5), ('B_meta', 5000, 0.4)]

    :raises ValueError: For an unknown name (the message lists the presets).
    """

    preset = _PRESETS.get(name)
    if preset is None:
        raise ValueError(f"Unknown preset {name!r}. Available: {', '.join(sorted(_PRESETS))}.")
    return copy.deepcopy(preset)


def list_presets() -> dict[str, str]:
    """The description of each preset, by name."""

    return {name: preset.description for name, preset in _PRESETS.items()}


def expand_preset(spec: object) -> object:
    """
    A config naming a preset (``{"preset": name, "phase": phase_name, **overrides}``) as the
    config of the Golden Pendulum aggregator of that phase: ``{"name": "GoldenPendulum", "lam":
    ..., "pcgrad": ..., **overrides}``; ``name`` may pick another method taking ``lam`` and
    ``pcgrad`` (``"DynamicK"``). ``phase`` may be left out for a preset of one phase. Any other
    spec is returned unchanged.

    :raises ValueError: For an unknown preset or phase, or a missing phase.
    """

    if not isinstance(spec, Mapping) or "preset" not in spec:
        return spec
    keywords: dict[str, Any] = dict(spec)
    preset = get_preset(keywords.pop("preset"))
    phase_name = keywords.pop("phase", None)
    phases = {phase.name: phase for phase in preset.phases}
    if phase_name is None and len(phases) == 1:
        (phase,) = phases.values()
    elif phase_name in phases:
        phase = phases[phase_name]
    else:
        raise ValueError(
            f"Preset {preset.name!r} needs a `phase` among {', '.join(map(repr, phases))}. "
            f"Found phase={phase_name!r}."
        )
    return {"name": "GoldenPendulum", "lam": phase.lam, "pcgrad": phase.pcgrad, **keywords}
