r"""
Runs one training script through two imports (golden-pendulum-mtl's ``golden_pendulum`` and our
``torchjd_golden.golden_pendulum``) and compares everything it recorded.

A script trains for several steps, so one step's result moves the parameters every later step
sees: the comparison is only as tight as the least settled step. The reference's golden QP reads
the sign of :math:`\alpha_k - \alpha^\varphi_k`, and where that is within rounding of zero its
result depends on the CPU (by up to ~2 %, see ``tests/_knife_edge.py``), and so does everything
after it. The workloads stay clear of such knife edges (the neck of :class:`Net`), and
:func:`run` checks it for every QP the reference solves, so that the tight comparison holds on
every CPU, and a change of workload that puts a step on a knife edge fails here, by name, rather
than on another CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import fields, is_dataclass
from types import ModuleType
from typing import Any
from unittest import mock

import golden_pendulum as reference
import golden_pendulum.core as reference_core
import golden_pendulum.pro as reference_pro
import golden_pendulum.pro.adaptive as reference_adaptive
import golden_pendulum.pro.dynamic_k as reference_dynamic_k
import torch
from torch import Tensor, nn

import torchjd_golden.golden_pendulum as ours
import torchjd_golden.golden_pendulum.pro as ours_pro

from .._asserts import relative_error
from .._knife_edge import golden_qp_branches, knife_edge_threshold, tight_tolerance

TASKS = ("returns", "rank", "quality", "vol", "mae", "regime")
# Loss scales spanning 300x, as the Golden Pendulum paper's heads.
SCALES = dict(zip(TASKS, (300.0, 40.0, 7.0, 1.0, 0.3, 2.0), strict=True))
# 16 m units of float64 rounding a step, over runs of up to 64 steps (measured: at most 100 units).
TOLERANCE = tight_tolerance(len(TASKS), torch.float64, units=16 * 64)

Script = Callable[[ModuleType, ModuleType, "Workload"], Iterator[Any]]


class Net(nn.Module):
    """
    A float64 backbone, a neck and one linear head per named task. The neck, shared by the heads
    and not part of the backbone, keeps the tasks' gradients overlapping when the backbone is
    frozen: with disjoint gradients the normalised Gramian is the identity, the golden targets
    are a fixed point of the QP up to rounding, and the reference's weights then follow the sign
    of rounding noise (its λ step), which no other implementation reproduces.
    """

    def __init__(self, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh())
        self.neck = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({name: nn.Linear(8, 1) for name in tasks})


class Workload:
    """A model, its optimizer and the batches of a run, the same for both imports."""

    def __init__(self, tasks: tuple[str, ...] = TASKS, *, seed: int = 0, lr: float = 0.02) -> None:
        torch.manual_seed(seed)
        self.model = Net(tasks).double()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed + 1)
        self.directions = {
            name: torch.randn(6, generator=generator, dtype=torch.float64) for name in tasks
        }
        self._generator = generator

    def losses(self, tasks: tuple[str, ...] = TASKS) -> dict[str, Tensor]:
        """One batch's losses of ``tasks``, in that order: targets with conflicting directions."""

        inputs = torch.randn(32, 6, generator=self._generator, dtype=torch.float64)
        features = self.model.neck(self.model.backbone(inputs))
        return {
            name: SCALES.get(name, 1.0)
            * (self.model.heads[name](features)[:, 0] - torch.tanh(inputs @ self.directions[name]))
            .pow(2)
            .mean()
            for name in tasks
        }

    def gradients(self) -> list[Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in self.model.parameters()]

    def flags(self) -> list[bool]:
        return [p.requires_grad for p in self.model.parameters()]

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


def run(script: Script, **workload: Any) -> dict[str, list[Any]]:
    """
    The records of ``script`` through each import, from identical workloads; every QP the
    reference solves must be clear of a knife edge.
    """

    with ExitStack() as stack:
        for module in (reference_core, reference_adaptive, reference_dynamic_k):
            stack.enter_context(
                mock.patch.object(module, "_solve_golden_qp", _clear_of_knife_edges)
            )
        theirs = list(script(reference, reference_pro, Workload(**workload)))
    return {"reference": theirs, "ours": list(script(ours, ours_pro, Workload(**workload)))}


_solve_golden_qp = reference_core._solve_golden_qp


def _clear_of_knife_edges(
    gramian: Tensor,
    targets: Tensor,
    lam: float = 0.5,
    n_iter: int = 25,
    min_weight_fraction: float = 0.02,
) -> Tensor:
    """The reference's QP, after checking that it reads no sign within rounding of zero."""

    _, margin = golden_qp_branches(gramian, float(lam), n_iter, min_weight_fraction)
    threshold = knife_edge_threshold(gramian.shape[0], gramian.dtype)
    assert margin > threshold, (
        f"the reference's QP reads sign(alpha_k - target_k) at |alpha_k - target_k| = {margin:.1e}"
        f", within rounding: its result depends on the CPU; change the workload"
    )
    return _solve_golden_qp(
        gramian, targets, lam=lam, n_iter=n_iter, min_weight_fraction=min_weight_fraction
    )


def assert_same_records(records: dict[str, list[Any]], worst: dict[str, float], label: str) -> None:
    """Every record of ours equals the reference's (floats and tensors to :data:`TOLERANCE`)."""

    assert len(records["ours"]) == len(records["reference"])
    for index, (mine, theirs) in enumerate(zip(records["ours"], records["reference"], strict=True)):
        _compare(mine, theirs, f"{label}[{index}]", worst, label)


def _compare(mine: Any, theirs: Any, path: str, worst: dict[str, float], label: str) -> None:
    if isinstance(theirs, Tensor):
        assert isinstance(mine, Tensor), path
        assert mine.shape == theirs.shape, path
        assert mine.dtype == theirs.dtype, path
        _record(relative_error(mine, theirs), path, worst, label)
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert isinstance(mine, float), (path, mine)
        scale = abs(theirs)
        error = abs(mine - theirs) / scale if scale > 0.0 else abs(mine - theirs)
        assert not math.isnan(error), path
        _record(error, path, worst, label)
    elif isinstance(theirs, dict):
        assert isinstance(mine, dict), path
        assert list(mine) == list(theirs), (path, list(mine), list(theirs))
        for key in theirs:
            _compare(mine[key], theirs[key], f"{path}.{key}", worst, label)
    elif isinstance(theirs, list | tuple):
        assert isinstance(mine, list | tuple), path
        assert len(mine) == len(theirs), (path, mine, theirs)
        for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            _compare(a, b, f"{path}[{k}]", worst, label)
    elif is_dataclass(theirs) and not isinstance(theirs, type):
        assert [f.name for f in fields(mine)] == [f.name for f in fields(theirs)], path
        for f in fields(theirs):
            _compare(
                getattr(mine, f.name), getattr(theirs, f.name), f"{path}.{f.name}", worst, label
            )
    else:
        assert mine == theirs, (path, mine, theirs)


def _record(error: float, path: str, worst: dict[str, float], label: str) -> None:
    assert error < TOLERANCE, (path, error)
    worst[label] = max(worst.get(label, 0.0), error)
