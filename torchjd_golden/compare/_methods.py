"""
The settings each method is compared with: its hyper-parameters, the optimizer paired with it,
and where each choice comes from, so that the report can print them under its tables.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchjd.aggregation import Aggregator

from ..config import _lookup, aggregator_from_config
from ..step import GramianSource
from ..step._sharded import gramian_weighting_of
from ._workloads import Workload

ADAM_BETAS = (0.9, 0.999)
"""PyTorch's default Adam moments, used for every method unless its settings say otherwise."""

LEARNING_RATE = 3e-3
BATCH_SIZE = 64

DEFAULT_METHODS = ("golden_pendulum", "gaba", "excess_mtl", "gcond", "mean", "upgrad", "nash_mtl")

GRAMIAN_SOURCES: tuple[GramianSource, ...] = ("parameters", "features")
"""
Where the training step takes the weights from (:class:`~torchjd_golden.JacobianDescent`'s
``gramian_from``): the Jacobian of the trunk's parameters (exact, every method), or the Gramian of
the tasks' gradients with respect to the trunk's output (fast, the Gramian weightings only).
"""

NASH_MTL_UPDATE_EVERY = 20
NASH_MTL_DEFAULT_MAX_TASKS = 10


@dataclass(frozen=True)
class Settings:
    """How one method is run and why: the keywords that differ from its class's defaults."""

    source: str
    """Where the hyper-parameters come from, in one sentence for the report's footnote."""

    keywords: Callable[[Workload, int], dict[str, Any]] = lambda _workload, _steps: {}
    """The constructor keywords for a workload and a number of training steps."""

    adam_betas: tuple[float, float] = ADAM_BETAS
    label_suffix: str = ""
    """Added to the method's name in the tables, for a setting a reader must see there."""

    collapse_reason: str | None = None
    """Why the method may still put nearly all its weight on one task, in one sentence."""

    slow: bool = False
    """Whether its runs take several times longer than the others' (they are started first)."""

    default_max_tasks: int | None = None
    """
    The most tasks of a workload the default run (no ``--methods``) trains it on; it runs on
    any workload when ``--methods`` names it.
    """

    left_out_reason: str = ""
    """Why the default run leaves it out above ``default_max_tasks``, in one sentence."""

    def in_default_run(self, workload: Workload) -> bool:
        """Whether the default run trains the method on ``workload``."""

        return self.default_max_tasks is None or len(workload.tasks) <= self.default_max_tasks


def _excess_mtl_keywords(workload: Workload, steps: int) -> dict[str, Any]:
    # Three epochs of statistics as the paper asks, but at most half the run, so that a short
    # run still shows the method's own weights.
    warmup = min(3 * workload.steps_per_epoch(BATCH_SIZE), steps // 2)
    return {"robust_step_size": 0.01, "n_warmup_steps": warmup}


def _nash_mtl_keywords(workload: Workload, steps: int) -> dict[str, Any]:
    return {"n_tasks": len(workload.tasks), "update_weights_every": NASH_MTL_UPDATE_EVERY}


SETTINGS: dict[str, Settings] = {
    "GoldenPendulum": Settings(
        "the defaults of golden-pendulum-mtl 0.2.0's golden_nash_backward, the paper's settings."
    ),
    "AdaptiveGoldenPendulum": Settings(
        "the defaults of golden_pendulum.pro.AdaptiveLambda (golden-pendulum-mtl 0.2.0); it is "
        "given each step's losses."
    ),
    "GABA": Settings("the defaults of the reference GABALoss (GRACE paper)."),
    "ExcessMTL": Settings(
        "robust_step_size=0.01 is LibMTL's default for ExcessMTL (torchjd's 1.0 moves every "
        "weight by up to e per step); the warm-up collects statistics for 3 epochs as the paper "
        "(Appendix C.1) and torchjd's docs recommend, at most half the run.",
        keywords=_excess_mtl_keywords,
        collapse_reason=(
            "ExcessMTL multiplies each weight by exp(step size x excess risk) every step, so a "
            "task whose excess-risk estimate stays above the others' takes all the weight "
            "exponentially fast."
        ),
    ),
    "GCond": Settings(
        "the official constructor's defaults; GCond's bias-corrected momentum (0.85) is the only "
        "first moment: Adam runs with betas=(0.0, 0.95), as the official README pairs it with "
        "AdamW(betas=(0.0, 0.95)).",
        adam_betas=(0.0, 0.95),
    ),
    "Mean": Settings("no hyper-parameters."),
    "Constant": Settings(
        "equal weights 1/m: Constant needs its weights and --methods names no values, so it "
        "makes the same update as Mean."
    ),
    "UPGrad": Settings("torchjd's defaults."),
    "NashMTL": Settings(
        f"update_weights_every={NASH_MTL_UPDATE_EVERY} is the speed knob of the authors' code "
        "(--update-weights-every, default 1): the convex solve runs every "
        f"{NASH_MTL_UPDATE_EVERY} steps, the weights are reused in between; max_norm=1.0 and "
        "optim_niter=20 are its defaults.",
        keywords=_nash_mtl_keywords,
        label_suffix=f" (solve every {NASH_MTL_UPDATE_EVERY} steps)",
        slow=True,
        default_max_tasks=NASH_MTL_DEFAULT_MAX_TASKS,
        left_out_reason=(
            "each of its solves runs 20 convex problems in m variables, and with 40 tasks its "
            "step is the slowest of the comparison (39 to 46 ms against Mean's 11 to 20, "
            "measured on many-tasks under different loads): its runs there would add a sixth "
            "to the default run's time. --methods naming nash_mtl runs it there."
        ),
    ),
}

_UNLISTED = Settings("its class's defaults (not tuned here).")

_REQUIRED: dict[str, Callable[[int, torch.device], Any]] = {
    "n_tasks": lambda m, _device: m,  # torchjd's NashMTL
    "weights": lambda m, device: torch.full((m,), 1.0 / m, device=device),  # torchjd's Constant
}
"""The required constructor arguments a comparison can fill in, from m and the device."""


@dataclass(frozen=True)
class Method:
    """A method ready to train: a fresh aggregator, its settings and the label of its row."""

    name: str
    """The name it was asked for, as ``aggregator_from_config`` reads it."""

    label: str
    aggregator: Aggregator
    settings: Settings
    gramian_from: GramianSource = "parameters"
    """Where its training step takes the weights from; "features" rows say so in their label."""


def build_method(
    name: str,
    workload: Workload,
    steps: int,
    device: torch.device | None = None,
    gramian_from: GramianSource = "parameters",
) -> Method:
    """
    A fresh aggregator for ``name`` (any :func:`~torchjd_golden.aggregator_from_config` name)
    with its comparison settings for ``workload`` and a run of ``steps`` steps, trained with the
    weights from ``gramian_from``; a tensor it is given (Constant's weights) is created on
    ``device`` (default: the CPU).

    :raises ValueError: For a name ``aggregator_from_config`` does not know, a class with a
        required argument the comparison cannot choose, or ``gramian_from="features"`` with a
        method that weights the Jacobian itself.
    :raises ImportError: For a method whose optional dependencies are missing (NashMTL).
    """

    if gramian_from not in GRAMIAN_SOURCES:
        raise ValueError(
            f"Parameter `gramian_from` must be one of {GRAMIAN_SOURCES}. Found {gramian_from!r}."
        )

    required = _required_arguments(name, len(workload.tasks), device or torch.device("cpu"))
    plain = aggregator_from_config({"name": name, **required})
    settings = SETTINGS.get(type(plain).__name__, _UNLISTED)
    keywords = settings.keywords(workload, steps)
    aggregator = (
        aggregator_from_config({"name": name, **required, **keywords}) if keywords else plain
    )
    if gramian_from == "features" and not weights_the_gramian(aggregator):
        raise ValueError(
            f"{aggregator} weights the Jacobian itself, not its Gramian: it has no step from the "
            "feature Gramian (gramian_from='features')."
        )
    mode = " (features)" if gramian_from == "features" else ""
    return Method(
        name=name,
        label=str(aggregator) + settings.label_suffix + mode,
        aggregator=aggregator,
        settings=settings,
        gramian_from=gramian_from,
    )


def weights_the_gramian(aggregator: Aggregator) -> bool:
    """
    Whether ``aggregator`` only weights the Gramian of the rows, so that the training step can
    give it the feature Gramian instead (the engine's own test).
    """

    return gramian_weighting_of(aggregator) is not None


def gramian_weighting(aggregator: Aggregator) -> nn.Module:
    """The weighting ``aggregator`` applies to the Gramian (that of a Gramian weighting only)."""

    weighting = gramian_weighting_of(aggregator)
    if weighting is None:
        raise ValueError(f"{aggregator} weights the Jacobian itself, not its Gramian.")
    return weighting


def _required_arguments(name: str, m: int, device: torch.device) -> dict[str, Any]:
    """The arguments without a default of the class ``name`` names, filled in from ``_REQUIRED``."""

    entry = _lookup("aggregator", name)
    required = [
        parameter.name
        for parameter in inspect.signature(entry.factory).parameters.values()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    unknown = [argument for argument in required if argument not in _REQUIRED]
    if unknown:
        raise ValueError(
            f"{entry.name} needs {', '.join(map(repr, unknown))}, which --methods cannot "
            "set: compare it in your own script with aggregator_from_config."
        )
    return {argument: _REQUIRED[argument](m, device) for argument in required}
