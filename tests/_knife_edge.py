r"""
Golden Pendulum's reference on a knife edge, and what a comparison with it can still require.

golden-pendulum-mtl's QP (``golden_pendulum.core._solve_golden_qp``) steps along
:math:`\mathrm{sign}(\alpha - \alpha^\varphi)`. Where some :math:`\alpha_k` sits on its target to
within rounding when that sign is read, the sign is the sign of rounding noise: a few units in the
last place of the step's input (another CPU's BLAS kernel summing in another order) turn the step,
and :math:`\alpha` ends up about :math:`\lambda \eta_t` away. Two tasks with disjoint gradients
are such a case: their normalised Gramian is the identity, and its diagonal, 0.9999999999999997
instead of 1.0, moves a weight from 0.38443 to 0.38184. There no implementation agrees with the
reference to float precision, not even the reference on another CPU, which differs from itself
by up to about 2 %.

What still holds there: the reference's result is one of its *branches*, the outcomes of its
QP when each sign read within rounding of zero takes each of its values (-1, 0 or 1), every other
read being the same on every CPU. :func:`golden_reference_step` replays the QP in float64, finds
the smallest :math:`|\alpha_k - \alpha^\varphi_k|` whose sign is read (the margin), and where the
margin is within rounding of zero (:func:`knife_edge_threshold`) enumerates the branches. A
result that equals one branch to float precision is one the reference can give, on one CPU or
another; a wrong step size, :math:`\lambda` or number of steps moves the weights off every branch
(``tests/schedule/test_curriculum.py`` shows it). It also runs
the reference itself on inputs nudged by a few units in the last place (:func:`nudged_gramians`):
its results there are branches too, and their spread is the reference's own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from golden_pendulum import golden_ratio_weights
from golden_pendulum.core import _pcgrad_resolve, _solve_golden_qp
from torch import Tensor

from ._asserts import relative_error

# A sign is read on a knife edge when |alpha_k - target_k| is within this many units of rounding
# per task: alpha sums to one, and each of the QP's steps adds a product with m terms.
KNIFE_EDGE_ULPS = 16
# The units in the last place by which one diagonal entry of the normalised Gramian is nudged,
# either way: as much as two CPUs' kernels differ there (3 units in the case that was measured).
NUDGES = (1, 2, 4, 8)
# More distinct states of the QP than this, and the enumeration of branches gives up.
MAX_BRANCHES = 5_000


def tight_tolerance(m: int, dtype: torch.dtype, units: float = 16.0) -> float:
    """``units`` units of ``dtype``'s rounding per task: the comparison of one branch's results."""

    return units * m * torch.finfo(dtype).eps


def knife_edge_threshold(m: int, dtype: torch.dtype) -> float:
    r"""The distance of :math:`\alpha_k` from its target below which its sign is rounding."""

    return KNIFE_EDGE_ULPS * m * torch.finfo(dtype).eps


def reference_step_size(t: int) -> float:
    r""":math:`\eta_t = 0.05 / (1 + 0.1 t)`, the step of the reference's QP."""

    return 0.05 / (1.0 + 0.1 * t)


def golden_qp_branches(
    normalized_gramian: Tensor,
    lam: float,
    n_iter: int = 25,
    min_weight_fraction: float = 0.02,
    *,
    threshold: float | None = None,
    step_size: Callable[[int], float] = reference_step_size,
) -> tuple[list[Tensor], float]:
    r"""
    The reference's QP replayed in float64: its solutions when every sign read within
    ``threshold`` of zero takes each of its values (one solution where none is, or where
    ``threshold`` is ``None``: the signs as this replay rounds them), and the margin,
    the smallest :math:`|\alpha_k - \alpha^\varphi_k|` whose sign is read. Signs are read from the
    second step on (the first reads :math:`\alpha^\varphi - \alpha^\varphi = 0` exactly, on every
    CPU), and not at all where :math:`\lambda = 0`. ``step_size`` is another schedule, for a test
    that must reject it. States closer than ``threshold`` are merged.
    """

    gramian = normalized_gramian.detach().double()
    m = gramian.shape[0]
    targets = golden_ratio_weights(m, dtype=torch.float64)
    grid = threshold or torch.finfo(torch.float64).eps
    states = [targets.clone()]
    margin = math.inf
    for t in range(n_iter):
        reads = t > 0 and lam != 0.0
        following: dict[tuple[float, ...], Tensor] = {}
        for alpha in states:
            offset = alpha - targets
            signs = torch.sign(offset)
            undecided: list[int] = []
            if reads:
                margin = min(margin, float(offset.abs().min()))
                if threshold is not None:
                    undecided = (offset.abs() <= threshold).nonzero().flatten().tolist()
            for choice in itertools.product((-1.0, 0.0, 1.0), repeat=len(undecided)):
                chosen = signs.clone()
                chosen[undecided] = torch.tensor(choice, dtype=torch.float64)
                stepped = alpha - step_size(t) * (2.0 * gramian @ alpha + lam * chosen)
                stepped = stepped.clamp(min=min_weight_fraction / m)
                stepped = stepped / stepped.sum()
                following.setdefault(tuple(torch.round(stepped / grid).tolist()), stepped)
        states = list(following.values())
        if len(states) > MAX_BRANCHES:
            raise RuntimeError(f"more than {MAX_BRANCHES} branches of the golden QP")
    return states, margin


def nudged_gramians(normalized_gramian: Tensor) -> Iterable[Tensor]:
    """The Gramian with one diagonal entry moved by each of :data:`NUDGES` units, either way."""

    eps = torch.finfo(normalized_gramian.dtype).eps
    for k in range(normalized_gramian.shape[0]):
        for units in NUDGES:
            for sign in (1.0, -1.0):
                nudged = normalized_gramian.clone()
                nudged[k, k] = nudged[k, k] * (1.0 + sign * units * eps)
                yield nudged


@dataclass(frozen=True)
class Outcome:
    r"""A combined gradient (flat) and the QP weights :math:`\alpha` that gave it."""

    gradient: Tensor
    alpha: Tensor


@dataclass(frozen=True)
class ReferenceStep:
    """
    The reference's result on one step (:attr:`outcome`), how close its QP came to a knife edge,
    and, on one, its branches and its results on nudged inputs.
    """

    outcome: Outcome
    margin: float
    threshold: float
    branches: Sequence[Outcome]
    nudged: Sequence[Outcome]

    @property
    def on_knife_edge(self) -> bool:
        return self.margin <= self.threshold

    def expected(self, gradient: Tensor) -> Outcome:
        """
        What ``gradient`` must equal to float precision: the reference's own result clear of a
        knife edge, and on one the branch nearest to ``gradient``.
        """

        if not self.on_knife_edge:
            return self.outcome
        return min(self.branches, key=lambda branch: relative_error(gradient, branch.gradient))

    def spread(self) -> float:
        """The largest relative difference of a result on nudged inputs from :attr:`outcome`."""

        return max(
            (relative_error(o.gradient, self.outcome.gradient) for o in self.nudged), default=0.0
        )


def golden_reference_step(
    jacobian: Tensor,
    *,
    lam: float = 0.5,
    n_iter: int = 25,
    min_weight_fraction: float = 0.02,
    pcgrad: bool = True,
) -> ReferenceStep:
    """
    ``golden_nash_backward``'s chain on the rows of ``jacobian`` (m >= 2 tasks), with the
    reference's functions in its order: normalised rows, their Gramian, the golden QP, PCGrad and
    the weighted sum. On a knife edge, the same PCGrad and sum for every branch of the QP, and the
    whole chain again on each of :func:`nudged_gramians`.
    """

    rows = jacobian / jacobian.norm(dim=1, keepdim=True).clamp(min=1e-8)
    normalized_gramian = rows @ rows.T
    m = jacobian.shape[0]

    def combine(alpha: Tensor) -> Outcome:
        resolved = _pcgrad_resolve(rows, alpha) if pcgrad else rows
        return Outcome((alpha.unsqueeze(1) * resolved).sum(dim=0), alpha)

    def run(gramian: Tensor) -> Outcome:
        targets = golden_ratio_weights(m, device=gramian.device, dtype=gramian.dtype)
        return combine(
            _solve_golden_qp(
                gramian, targets, lam=lam, n_iter=n_iter, min_weight_fraction=min_weight_fraction
            )
        )

    threshold = knife_edge_threshold(m, jacobian.dtype)
    solutions, margin = golden_qp_branches(
        normalized_gramian, lam, n_iter, min_weight_fraction, threshold=threshold
    )
    on_edge = margin <= threshold
    return ReferenceStep(
        outcome=run(normalized_gramian),
        margin=margin,
        threshold=threshold,
        branches=[combine(alpha.to(jacobian.dtype)) for alpha in solutions] if on_edge else [],
        nudged=[run(gramian) for gramian in nudged_gramians(normalized_gramian)] if on_edge else [],
    )


def task_jacobian(losses: Mapping[str, Tensor], parameters: Sequence[Tensor]) -> Tensor:
    """The gradients of ``losses`` with respect to ``parameters``, one flat row per loss."""

    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for g, p in zip(grads, parameters, strict=True)
                ]
            )
        )
    return torch.stack(rows)
