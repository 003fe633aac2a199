"""
The registry of every method and variant the tests run, as ``optim_db`` is for PyTorch's
optimizer tests: what to build, what input it takes, whether it keeps state, the extra inputs it
needs, the invariances it claims and the parameter values it must refuse. The generic tests
(structure, validation, dtypes, state, compilation, composition, torchjd paths, hostile input) are
driven by it, so that a new method or variant is one entry here and inherits all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchjd.aggregation import Aggregator, Mean

import torchjd_golden as tg

# Of the aggregation A, on a fresh instance: "permutation": A(PJ) = A(J); "row scaling":
# A(DJ) = A(J) for a positive diagonal D; "scale-free": A(cJ) = A(J); "homogeneous": A(cJ) = c A(J),
# for c > 0.
Invariance = Literal["permutation", "row scaling", "scale-free", "homogeneous"]


def _no_extra_input(module: nn.Module, matrix: Tensor) -> None:
    del module, matrix


def _losses_from_rows(module: nn.Module, stat: Tensor) -> None:
    """Per-task losses for the adaptive λ, spread as the rows of its input (J or its Gramian)."""

    module.losses = stat.abs().sum(dim=1).double() + 1e-3  # type: ignore[assignment]


@dataclass(frozen=True)
class Method:
    """One method or variant: an aggregator or a weighting with given settings."""

    name: str
    factory: Callable[..., nn.Module]
    settings: Mapping[str, Any] = field(default_factory=dict)
    takes: Literal["jacobian", "gramian"] = "jacobian"
    stateful: bool = False
    extra_inputs: Callable[[nn.Module, Tensor], None] = _no_extra_input
    invariances: frozenset[Invariance] = frozenset()
    simplex_weights: bool = False  # the weights are non-negative and sum to one
    weighted_sum: bool = True  # an aggregator's output is its weighting's weights times J
    bad_values: tuple[tuple[str, object], ...] = ()
    good_values: tuple[tuple[str, object], ...] = ()  # valid non-default values, for setters
    expected_repr: str = ""  # of make()
    # Whether no call reads values on the host, so that every call traces with
    # torch.compile(fullgraph=True) and none synchronises an accelerator. Not DynamicK's with
    # auto_group: a regrouping call copies the cosines to the host (documented), and the host
    # follows the regrouping schedule in Python.
    sync_free_calls: bool = True

    def make(self, **overrides: Any) -> nn.Module:
        return self.factory(**{**self.settings, **overrides})

    @property
    def needs_extra_inputs(self) -> bool:
        return self.extra_inputs is not _no_extra_input

    @property
    def is_aggregator(self) -> bool:
        return isinstance(self.factory, type) and issubclass(self.factory, Aggregator)

    def input_of(self, jacobian: Tensor) -> Tensor:
        """What this method is called on for ``jacobian``: itself, or its Gramian."""

        return jacobian @ jacobian.T if self.takes == "gramian" else jacobian

    def step(
        self, module: nn.Module, stat: Tensor, runner: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Sets the extra inputs of ``module`` for ``stat`` (its input), then calls ``runner``."""

        self.extra_inputs(module, stat)
        output: Tensor = (runner if runner is not None else module)(stat)
        return output

    def __str__(self) -> str:
        return self.name


_GOLDEN_PENDULUM_BAD = (
    ("lam", -0.1),
    ("lam", float("nan")),
    ("lam", "0.5"),
    ("n_iter", -1),
    ("n_iter", 2.5),
    ("min_weight_fraction", -0.1),
    ("min_weight_fraction", 1.5),
    ("pcgrad", 1),
)
_GOLDEN_PENDULUM_GOOD = (("lam", 1.5), ("n_iter", 7), ("min_weight_fraction", 0.1))
_ADAPTIVE_BAD = (
    ("lam_init", -1.0),
    ("lam_min", 3.0),
    ("lam_max", 0.01),
    ("ema_decay", 1.0),
    ("conflict_target", 1.5),
    ("sensitivity", -1.0),
    ("loss_ratio_aware", "yes"),
    ("n_iter", -3),
    ("min_weight_fraction", 2.0),
    ("pcgrad", None),
)
_ADAPTIVE_GOOD = (("lam_init", 0.7), ("ema_decay", 0.5), ("sensitivity", 3.0))
_GABA_BAD = (
    ("beta", -0.1),
    ("beta", 1.5),
    ("beta", float("inf")),
    ("warmup_steps", -1),
    ("warmup_steps", 1.0),
    ("min_weight", 1.0),
    ("min_weight", -0.01),
)
_GABA_GOOD = (("beta", 0.7), ("warmup_steps", 3), ("min_weight", 0.1))
_EXCESS_MTL_BAD = (
    ("robust_step_size", 0.0),
    ("robust_step_size", -1.0),
    ("n_warmup_steps", -1),
    ("n_warmup_steps", 0.5),
)
_EXCESS_MTL_GOOD = (("robust_step_size", 0.3), ("n_warmup_steps", 4))
_GCOND_WEIGHTING_BAD = (
    ("conflict_thresholds", (-0.8, -0.5)),
    ("conflict_thresholds", (-0.5, -0.8, 0.0)),
    ("conflict_thresholds", (-1.5, -0.5, 0.0)),
    ("conflict_thresholds", "abc"),
    ("use_smooth_logic", 1),
    ("remap_power", 0.0),
    ("dominance_window", -1),
    ("tie_breaking_weights", (0.0, 0.0)),
    ("tie_breaking_weights", (0.5,)),
    ("tie_breaking_weights", (-0.5, 1.0)),
    ("norm_ema_beta", 1.0),
    ("norm_cap", 0.0),
    ("projection_max_iters", 0),
    ("eps", 0.0),
)
_GCOND_BAD = (*_GCOND_WEIGHTING_BAD, ("momentum_beta", 1.0), ("momentum_beta", -0.1))
_GCOND_WEIGHTING_GOOD = (
    ("conflict_thresholds", (-0.9, -0.6, -0.1)),
    ("norm_cap", 2.0),
    ("dominance_window", 5),
    ("tie_breaking_weights", (0.5, 0.5)),
)
_GCOND_GOOD = (*_GCOND_WEIGHTING_GOOD, ("momentum_beta", 0.5))

_DYNAMIC_K_BAD = (
    *_GOLDEN_PENDULUM_BAD,
    ("groups", tg.TaskGroup("g", [0])),
    ("groups", [tg.TaskGroup("g", [0]), tg.TaskGroup("g", [1])]),
    ("groups", [tg.TaskGroup("g", [0, 1]), tg.TaskGroup("h", [1])]),  # a task in two groups
    ("groups", [tg.TaskGroup("_ungrouped", [0])]),  # the catch-all group's name
    ("auto_group", "yes"),
    ("regroup_every", 0),
    ("similarity_threshold", 1.5),
    ("pcgrad_across_groups", None),
)
_DYNAMIC_K_GOOD = (
    *_GOLDEN_PENDULUM_GOOD,
    ("groups", (tg.TaskGroup("h", [1, 3], lam=0.2),)),
    ("regroup_every", 7),
    ("similarity_threshold", -0.5),
    ("pcgrad_across_groups", True),
)
_DYNAMIC_K_GROUPS = [tg.TaskGroup("g", [0, 2])]


def _dynamic_k_repr(
    name: str, groups: str, *, auto: bool = False, every: int = 500, across: bool = False
) -> str:
    threshold = 0.0 if auto else 0.5
    return (
        f"{name}(groups={groups}, auto_group={auto}, regroup_every={every}, "
        f"similarity_threshold={threshold}, lam=0.5, n_iter=25, min_weight_fraction=0.02, "
        f"pcgrad=True, pcgrad_across_groups={across})"
    )


_GCOND_PARAMETERS = (
    "conflict_thresholds=(-0.8, -0.5, 0.0), use_smooth_logic={smooth}, remap_power=2.0, "
    "dominance_window=3, tie_breaking_weights=(0.8, 0.2), norm_ema_beta=0.95, norm_cap={cap}, "
    "projection_max_iters=None"
)
_ADAPTIVE_PARAMETERS = (
    "lam_init=0.5, lam_min=0.05, lam_max=2.0, ema_decay=0.95, conflict_target=0.3, "
    "sensitivity=1.0, loss_ratio_aware={aware}, n_iter=25, min_weight_fraction=0.02, pcgrad=True"
)

METHODS: list[Method] = [
    Method(
        "GoldenPendulum",
        tg.GoldenPendulum,
        invariances=frozenset({"row scaling", "scale-free"}),
        bad_values=_GOLDEN_PENDULUM_BAD,
        good_values=(*_GOLDEN_PENDULUM_GOOD, ("pcgrad", False)),
        expected_repr="GoldenPendulum(lam=0.5, n_iter=25, min_weight_fraction=0.02, pcgrad=True)",
    ),
    Method(
        "GoldenPendulum(pcgrad=False, lam=2.0)",
        tg.GoldenPendulum,
        {"pcgrad": False, "lam": 2.0},
        invariances=frozenset({"row scaling", "scale-free"}),
        expected_repr="GoldenPendulum(lam=2.0, n_iter=25, min_weight_fraction=0.02, pcgrad=False)",
    ),
    Method(
        "GoldenPendulumWeighting",
        tg.GoldenPendulumWeighting,
        takes="gramian",
        bad_values=_GOLDEN_PENDULUM_BAD,
        good_values=_GOLDEN_PENDULUM_GOOD,
        expected_repr=(
            "GoldenPendulumWeighting(lam=0.5, n_iter=25, min_weight_fraction=0.02, pcgrad=True)"
        ),
    ),
    Method(
        "AdaptiveGoldenPendulum",
        tg.AdaptiveGoldenPendulum,
        stateful=True,
        extra_inputs=_losses_from_rows,
        bad_values=_ADAPTIVE_BAD,
        good_values=_ADAPTIVE_GOOD,
        expected_repr=f"AdaptiveGoldenPendulum({_ADAPTIVE_PARAMETERS.format(aware=True)})",
    ),
    Method(
        "AdaptiveGoldenPendulum(loss_ratio_aware=False)",
        tg.AdaptiveGoldenPendulum,
        {"loss_ratio_aware": False},
        stateful=True,
        invariances=frozenset({"row scaling", "scale-free"}),
        expected_repr=f"AdaptiveGoldenPendulum({_ADAPTIVE_PARAMETERS.format(aware=False)})",
    ),
    Method(
        "AdaptiveGoldenPendulumWeighting",
        tg.AdaptiveGoldenPendulumWeighting,
        takes="gramian",
        stateful=True,
        extra_inputs=_losses_from_rows,
        bad_values=_ADAPTIVE_BAD,
        good_values=_ADAPTIVE_GOOD,
        expected_repr=(
            f"AdaptiveGoldenPendulumWeighting({_ADAPTIVE_PARAMETERS.format(aware=True)})"
        ),
    ),
    Method(
        "DynamicK",
        tg.DynamicK,
        {"groups": _DYNAMIC_K_GROUPS},
        stateful=True,
        invariances=frozenset({"row scaling", "scale-free"}),
        bad_values=_DYNAMIC_K_BAD,
        good_values=_DYNAMIC_K_GOOD,
        expected_repr=_dynamic_k_repr("DynamicK", "[TaskGroup(name='g', tasks=(0, 2), lam=None)]"),
    ),
    Method(
        "DynamicK(auto_group=True, regroup_every=3)",
        tg.DynamicK,
        {"auto_group": True, "regroup_every": 3, "similarity_threshold": 0.0},
        stateful=True,
        invariances=frozenset({"row scaling", "scale-free"}),
        sync_free_calls=False,
        expected_repr=_dynamic_k_repr("DynamicK", "[]", auto=True, every=3),
    ),
    Method(
        "DynamicKWeighting(pcgrad_across_groups=True)",
        tg.DynamicKWeighting,
        {
            "groups": [tg.TaskGroup("g", [1, 3]), tg.TaskGroup("h", [0])],
            "pcgrad_across_groups": True,
        },
        takes="gramian",
        stateful=True,
        bad_values=_DYNAMIC_K_BAD,
        good_values=_DYNAMIC_K_GOOD,
        expected_repr=_dynamic_k_repr(
            "DynamicKWeighting",
            "[TaskGroup(name='g', tasks=(1, 3), lam=None), "
            "TaskGroup(name='h', tasks=(0,), lam=None)]",
            across=True,
        ),
    ),
    Method(
        "GABA",
        tg.GABA,
        {"beta": 0.5, "warmup_steps": 1},
        stateful=True,
        invariances=frozenset({"permutation", "homogeneous"}),
        bad_values=_GABA_BAD,
        good_values=_GABA_GOOD,
        expected_repr="GABA(beta=0.5, warmup_steps=1, min_weight=0.05)",
    ),
    Method(
        "GABAWeighting",
        tg.GABAWeighting,
        {"beta": 0.9, "warmup_steps": 2},
        takes="gramian",
        stateful=True,
        invariances=frozenset({"permutation", "homogeneous"}),
        simplex_weights=True,
        bad_values=_GABA_BAD,
        good_values=_GABA_GOOD,
        expected_repr="GABAWeighting(beta=0.9, warmup_steps=2, min_weight=0.05)",
    ),
    Method(
        "ExcessMTL",
        tg.ExcessMTL,
        {"n_warmup_steps": 2},
        stateful=True,
        invariances=frozenset({"permutation"}),
        bad_values=_EXCESS_MTL_BAD,
        good_values=_EXCESS_MTL_GOOD,
        expected_repr="ExcessMTL(robust_step_size=1.0, n_warmup_steps=2)",
    ),
    Method(
        "ExcessMTLWeighting",
        tg.ExcessMTLWeighting,
        {"robust_step_size": 0.5},
        stateful=True,
        invariances=frozenset({"permutation"}),
        simplex_weights=True,
        bad_values=_EXCESS_MTL_BAD,
        good_values=_EXCESS_MTL_GOOD,
        expected_repr="ExcessMTLWeighting(robust_step_size=0.5, n_warmup_steps=0)",
    ),
    Method(
        "GCond",
        tg.GCond,
        stateful=True,
        weighted_sum=False,  # the momentum: an Aggregator without weights
        bad_values=_GCOND_BAD,
        good_values=_GCOND_GOOD,
        expected_repr=(
            f"GCond({_GCOND_PARAMETERS.format(smooth=True, cap=None)}, momentum_beta=0.85, "
            "eps=1e-08)"
        ),
    ),
    Method(
        "GCond(legacy, norm_cap=5.0)",
        tg.GCond,
        {"use_smooth_logic": False, "norm_cap": 5.0},
        stateful=True,
        weighted_sum=False,
        expected_repr=(
            f"GCond({_GCOND_PARAMETERS.format(smooth=False, cap=5.0)}, momentum_beta=0.85, "
            "eps=1e-08)"
        ),
    ),
    Method(
        "GCond(momentum_beta=0.0)",
        tg.GCond,
        {"momentum_beta": 0.0},
        stateful=True,  # the update is resolution_weights^T J, but GCond still returns no weights
        expected_repr=(
            f"GCond({_GCOND_PARAMETERS.format(smooth=True, cap=None)}, momentum_beta=0.0, "
            "eps=1e-08)"
        ),
    ),
    Method(
        "GCondWeighting",
        tg.GCondWeighting,
        {"use_smooth_logic": False},
        stateful=True,
        bad_values=_GCOND_WEIGHTING_BAD,
        good_values=_GCOND_WEIGHTING_GOOD,
        expected_repr=(
            f"GCondWeighting({_GCOND_PARAMETERS.format(smooth=False, cap=None)}, eps=1e-08)"
        ),
    ),
]

AGGREGATORS = [method for method in METHODS if method.is_aggregator]
WEIGHTINGS = [method for method in METHODS if not method.is_aggregator]
STATEFUL = [method for method in METHODS if method.stateful]


def weighting_of(aggregator: nn.Module) -> nn.Module:
    """The weighting an aggregator of this package holds (the Gramian one for Gramian ones)."""

    inner = getattr(aggregator, "gramian_weighting", None) or aggregator.weighting
    assert isinstance(inner, nn.Module)
    return inner


def jacobians(
    method: Method, m: int = 4, count: int = 8, dtype: torch.dtype = torch.float64, n: int = 24
) -> list[Tensor]:
    """Inputs for ``method``: Jacobians of conflicting rows over four decades, or their Gramians."""

    from ._inputs import conflicting_jacobian  # noqa: PLC0415 - keeps this module's imports light

    return [
        method.input_of(conflicting_jacobian(m, n, seed=s, decades=4.0, dtype=dtype))
        for s in range(count)
    ]


class NamedMean(Mean):
    """torchjd's Mean with the `tasks` property of the core's contract, recording what it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, ...] | None] = []

    @property
    def tasks(self) -> tuple[str, ...] | None:
        return self.seen[-1] if self.seen else None

    @tasks.setter
    def tasks(self, names: tuple[str, ...] | None) -> None:
        self.seen.append(names)
