r"""
Task groups: Golden Pendulum within groups of named tasks, golden-ratio weights across them.

Reference: ``golden_pendulum.pro.DynamicK`` and ``TaskGroup`` (``golden-pendulum-mtl`` 0.2.0).
The reference promises to cut the :math:`O(K^2)` cost of the Gram matrix but builds the full
matrix and runs PCGrad over all tasks; here, by default, a call only reads the diagonal blocks of
the Gramian (one per group), and :class:`DynamicK` only computes those.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import Matrix, PSDMatrix

from ._aggregator_bases import Forwarded, ForwardedConverting, GramianAggregator
from ._golden_pendulum import (
    _MIN_NORM,
    GoldenPendulumParameters,
    golden_pendulum_weights,
    golden_ratio_weights,
    pendulum_weights,
)
from ._gramian import (
    accumulation_dtype,
    all_finite,
    compute_gramian,
    nan_unless,
    normalize_gramian,
)
from ._tasks import NamedTasks, TaskNames
from ._torchjd_compat import GramianWeightingBase, NonDifferentiable, weighting_of_matrix
from ._validation import check_bool, check_input, check_int, check_real

CATCH_ALL = "_ungrouped"
"""Name of the group that collects the tasks of a call that no group lists."""

GroupSpec: TypeAlias = "TaskGroup | Mapping[str, Any]"


def ordered_names(names: Iterable[Hashable]) -> tuple[Hashable, ...]:
    """
    ``names`` as a tuple: in the given order for a sequence, sorted for a set (by ``repr`` when
    the names cannot be compared), so that a set of names always gives the same order.
    """

    if not isinstance(names, set | frozenset):
        return tuple(names)
    try:
        return tuple(sorted(names))
    except TypeError:
        return tuple(sorted(names, key=repr))


@dataclass(frozen=True, init=False)
class TaskGroup:
    r"""
    Tasks balanced together by :class:`DynamicKWeighting`.

    Within a group the golden-ratio targets are assigned along :attr:`tasks`, the largest to the
    last: give a list to choose the order, or a set to have them sorted by name (as the
    reference does).

    :param name: The group's name.
    :param tasks: The names of its tasks (distinct, hashable).
    :param lam: Its own :math:`\lambda`, or ``None`` for the weighting's.
    """

    name: str
    tasks: tuple[Hashable, ...]
    lam: float | None

    def __init__(self, name: str, tasks: Iterable[Hashable] = (), lam: float | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Attribute `name` must be a non-empty string. Found name={name!r}.")
        ordered = ordered_names(tasks)
        _check_distinct("tasks", ordered)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "tasks", ordered)
        object.__setattr__(self, "lam", None if lam is None else check_real("lam", lam, low=0.0))

    @classmethod
    def of(cls, spec: GroupSpec) -> TaskGroup:
        """A group from a :class:`TaskGroup` or a mapping of its fields (as in a config file)."""

        if isinstance(spec, TaskGroup):
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise ValueError(f"A task group is a TaskGroup or a mapping of its fields. Found {spec!r}.")


def _check_distinct(name: str, names: Sequence[Hashable]) -> None:
    try:
        distinct = len(set(names)) == len(names)
    except TypeError as error:
        raise ValueError(
            f"Attribute `{name}` must hold hashable names. Found {names!r}."
        ) from error
    if not distinct:
        raise ValueError(f"Attribute `{name}` must hold distinct names. Found {names!r}.")


@dataclass(frozen=True)
class _Block:
    """A group, and the rows of its tasks present in a call, in the group's order."""

    group: TaskGroup
    rows: tuple[int, ...]


class DynamicKWeighting(
    GoldenPendulumParameters, NamedTasks, GramianWeightingBase, Stateful, NonDifferentiable
):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.Weighting`
    [:class:`~torchjd.linalg.PSDMatrix`] of :class:`DynamicK`: Golden Pendulum within groups of
    named tasks, golden-ratio weights across the groups, as ``golden_pendulum.pro.DynamicK``.

    The rows of a call are named by :attr:`tasks` (by default ``0, ..., m-1``). The groups with a
    task in the call are taken in the order of :attr:`groups`, then a catch-all group
    (``"_ungrouped"``, sorted by name) for the tasks no group lists; each keeps its tasks present
    in the call. With :math:`P` such groups, group :math:`p` gets the golden weight
    :math:`\beta_p = \varphi^p / \sum_q \varphi^q` (:func:`golden_ratio_weights`), and within it
    :class:`GoldenPendulumWeighting` (with the group's :math:`\lambda`) runs on its block
    :math:`G_{pp}` of the Gramian, giving the QP solution :math:`\alpha^{(p)}` and weights
    :math:`w^{(p)}` (with PCGrad inside the group when ``pcgrad``). The weights are

    .. math::

        w_k = \beta_p\, w^{(p)}_k \quad (k \in p), \qquad
        w_k = \beta_p / \max(\|J_k\|, 10^{-8}) \ \text{for a group of one task,}

    and the normalised-gradient weights :math:`\alpha_k = \beta_p \alpha^{(p)}_k` (or
    :math:`\beta_p`) sum to one (:attr:`alpha`). A task listed in several groups takes part in
    each, and its weights from them add up. With one row in all, the weight is 1 (the raw
    gradient, as :class:`GoldenPendulum`).

    **Cost.** Only the blocks :math:`G_{pp}` are read: :math:`\sum_p k_p^2` inner products of
    gradients instead of :math:`K^2`, which :class:`DynamicK` exploits by computing only those
    blocks. Conflicts *between* groups are therefore not resolved. With
    ``pcgrad_across_groups=True`` the weighting does what the reference does instead: the QPs
    run without PCGrad, then PCGrad runs over all normalised gradients with priorities
    :math:`\alpha`, so the full Gramian is read, and :math:`w = S C^\top \alpha` (a task in
    several groups then takes the weight of the last one, and :math:`\alpha` is renormalised,
    also as the reference).

    **Automatic groups.** With ``auto_group``, every ``regroup_every`` calls (and whenever there is
    no group) the tasks of the call are grouped greedily by cosine similarity, as the reference
    does: in row order, a task starts a group, and each later ungrouped task joins it if its
    cosine with every member is at least ``similarity_threshold``. These groups are named
    ``auto_group_0, ...`` and list their tasks sorted. A regrouping call reads the full Gramian and
    copies its cosines to the host once; the other calls only read the blocks and never
    synchronise. A non-finite Gramian gives NaN weights and does not regroup.

    **State.** The groups (changed by regrouping, :meth:`add_task` and :meth:`remove_task`), the
    task names and the number of calls travel in ``state_dict`` (as extra state of plain Python
    values, so ``torch.load(weights_only=True)`` reads it, for names that are strings or numbers)
    and :meth:`reset` restores the groups given at construction.

    :param groups: The groups (:class:`TaskGroup`, or mappings of their fields), or ``None``.
    :param auto_group: Whether to find the groups by gradient similarity.
    :param regroup_every: Number of calls between two regroupings.
    :param similarity_threshold: The cosine a task needs with every member to join a group.
    :param lam: :math:`\lambda` of the groups that have none.
    :param n_iter: Number of projected-gradient steps of each QP.
    :param min_weight_fraction: Floor of every :math:`\alpha^{(p)}_k`, as a fraction of
        :math:`1/k_p`.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    :param pcgrad_across_groups: Whether PCGrad runs over all tasks with the hierarchical
        weights, as the reference (reads the full Gramian), instead of within each group.
    """

    def __init__(
        self,
        groups: Sequence[GroupSpec] | None = None,
        auto_group: bool = False,
        regroup_every: int = 500,
        similarity_threshold: float = 0.5,
        lam: float = 0.5,
        n_iter: int = 25,
        min_weight_fraction: float = 0.02,
        pcgrad: bool = True,
        pcgrad_across_groups: bool = False,
    ) -> None:
        super().__init__()
        self._initial_groups = _checked_groups(groups or ())
        self.groups = self._initial_groups
        self.auto_group = auto_group
        self.regroup_every = regroup_every
        self.similarity_threshold = similarity_threshold
        self.lam = lam
        self.n_iter = n_iter
        self.min_weight_fraction = min_weight_fraction
        self.pcgrad = pcgrad
        self.pcgrad_across_groups = pcgrad_across_groups
        self.step_count = 0
        self.alpha: Tensor | None = None
        self.active_groups: tuple[TaskGroup, ...] = ()

    @property
    def groups(self) -> tuple[TaskGroup, ...]:
        """The current groups (the constructor's, or the ones found by the last regrouping)."""
        return self._groups

    @groups.setter
    def groups(self, value: Sequence[GroupSpec]) -> None:
        self._groups = _checked_groups(value)

    @property
    def auto_group(self) -> bool:
        """Whether the groups are found by gradient similarity."""
        return self._auto_group

    @auto_group.setter
    def auto_group(self, value: bool) -> None:
        self._auto_group = check_bool("auto_group", value)

    @property
    def regroup_every(self) -> int:
        """Number of calls between two regroupings."""
        return self._regroup_every

    @regroup_every.setter
    def regroup_every(self, value: int) -> None:
        self._regroup_every = check_int("regroup_every", value, low=1)

    @property
    def similarity_threshold(self) -> float:
        """The cosine a task needs with every member of a group to join it."""
        return self._similarity_threshold

    @similarity_threshold.setter
    def similarity_threshold(self, value: float) -> None:
        self._similarity_threshold = check_real("similarity_threshold", value, low=-1.0, high=1.0)

    @property
    def lam(self) -> float:
        """:math:`\\lambda` of the groups that have none."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_real("lam", value, low=0.0)

    @property
    def pcgrad_across_groups(self) -> bool:
        """Whether PCGrad runs over all tasks (the reference's way) rather than within groups."""
        return self._pcgrad_across_groups

    @pcgrad_across_groups.setter
    def pcgrad_across_groups(self, value: bool) -> None:
        self._pcgrad_across_groups = check_bool("pcgrad_across_groups", value)

    @property
    def group_weights(self) -> dict[str, float]:
        """The golden weight :math:`\\beta_p` of each group of the last call, by group name."""
        if not self.active_groups:
            return {}
        weights = golden_ratio_weights(len(self.active_groups), dtype=torch.float64).tolist()
        return {group.name: w for group, w in zip(self.active_groups, weights, strict=True)}

    def add_task(self, task: Hashable, group: str) -> None:
        """Adds ``task`` at the end of the group named ``group`` (a new group if none is)."""

        groups = list(self._groups)
        for index, existing in enumerate(groups):
            if existing.name == group:
                if task not in existing.tasks:
                    groups[index] = TaskGroup(group, (*existing.tasks, task), existing.lam)
                break
        else:
            groups.append(TaskGroup(group, (task,)))
        self._groups = tuple(groups)

    def remove_task(self, task: Hashable) -> None:
        """Removes ``task`` from every group (a group left empty stays, and is skipped)."""

        self._groups = tuple(
            TaskGroup(g.name, tuple(t for t in g.tasks if t != task), g.lam) for g in self._groups
        )

    def reset(self) -> None:
        """Restores the groups given at construction and forgets the number of calls."""

        self._groups = self._initial_groups
        self.step_count = 0
        self.alpha = None
        self.active_groups = ()

    def regroups_next_call(self) -> bool:
        """Whether the next call finds new groups (and so reads the full Gramian)."""

        return self.auto_group and (self.step_count % self.regroup_every == 0 or not self._groups)

    def gramian_blocks(self, n_tasks: int) -> list[list[int]] | None:
        """
        The sets of rows whose Gramian block the next call with ``n_tasks`` rows reads, or
        ``None`` when it reads the whole Gramian (regrouping, or PCGrad across groups). The
        aggregator computes only these blocks.
        """

        if n_tasks == 1 or self.pcgrad_across_groups or self.regroups_next_call():
            return None
        return [list(block.rows) for block in self._blocks(self._row_names(n_tasks))]

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        check_input(gramian, self, gramian=True)
        m = gramian.shape[0]
        names = self._row_names(m)
        working = gramian.to(accumulation_dtype(gramian.dtype))
        if m == 1:
            self.step_count += 1
            self.alpha = torch.ones_like(working[0])
            self.active_groups = (TaskGroup(CATCH_ALL, names),)
            return nan_unless(all_finite(working), self.alpha).to(gramian.dtype)
        if self.regroups_next_call():
            self._regroup(working, names)
        blocks = self._blocks(names)
        self.step_count += 1
        self.active_groups = tuple(
            TaskGroup(b.group.name, [names[r] for r in b.rows], b.group.lam) for b in blocks
        )
        if self.pcgrad_across_groups:
            weights, alpha = self._weights_with_global_pcgrad(working, blocks)
        else:
            weights, alpha = self._weights_within_groups(working, blocks)
        self.alpha = alpha
        return nan_unless(all_finite(working), weights).to(gramian.dtype)

    def _row_names(self, m: int) -> tuple[Hashable, ...]:
        names = self._call_tasks(m)
        return tuple(range(m)) if names is None else names

    def _blocks(self, names: tuple[Hashable, ...]) -> list[_Block]:
        row_of = {name: row for row, name in enumerate(names)}
        blocks: list[_Block] = []
        for group in self._groups:
            rows = tuple(row_of[t] for t in group.tasks if t in row_of)
            if rows:
                blocks.append(_Block(group, rows))
        grouped = {names[row] for block in blocks for row in block.rows}
        ungrouped = ordered_names({name for name in names if name not in grouped})
        if ungrouped:
            blocks.append(_Block(TaskGroup(CATCH_ALL), tuple(row_of[t] for t in ungrouped)))
        return blocks

    def _regroup(self, gramian: Tensor, names: tuple[Hashable, ...]) -> None:
        cosine, _ = normalize_gramian(gramian, min_norm=_MIN_NORM)
        values = cosine.tolist()  # the one host read of a regrouping call
        if not all(math.isfinite(v) for row in values for v in row):
            return
        unassigned = list(range(len(names)))
        groups: list[TaskGroup] = []
        while unassigned:
            members = [unassigned.pop(0)]
            for j in list(unassigned):
                if all(values[i][j] >= self.similarity_threshold for i in members):
                    members.append(j)
                    unassigned.remove(j)
            tasks = {names[i] for i in members}
            groups.append(TaskGroup(f"auto_group_{len(groups)}", tasks))
        self._groups = tuple(groups)

    def _solve_block(self, gramian: Tensor, block: _Block, pcgrad: bool) -> tuple[Tensor, Tensor]:
        """Golden Pendulum on the block of ``gramian``: weights on its rows and QP solution."""

        index = torch.tensor(block.rows, device=gramian.device)
        sub = gramian.index_select(0, index).index_select(1, index)
        if len(block.rows) == 1:
            _, inverse_norm = normalize_gramian(sub, min_norm=_MIN_NORM)
            return inverse_norm, torch.ones_like(inverse_norm)
        lam = self.lam if block.group.lam is None else block.group.lam
        return golden_pendulum_weights(sub, lam, self.n_iter, self.min_weight_fraction, pcgrad)

    def _weights_within_groups(
        self, gramian: Tensor, blocks: list[_Block]
    ) -> tuple[Tensor, Tensor]:
        betas = golden_ratio_weights(len(blocks), device=gramian.device, dtype=gramian.dtype)
        weights = gramian.new_zeros(gramian.shape[0])
        alpha = gramian.new_zeros(gramian.shape[0])
        for beta, block in zip(betas, blocks, strict=True):
            block_weights, block_alpha = self._solve_block(gramian, block, self.pcgrad)
            index = torch.tensor(block.rows, device=gramian.device)
            weights.index_add_(0, index, beta * block_weights)
            alpha.index_add_(0, index, beta * block_alpha)
        return weights, alpha

    def _weights_with_global_pcgrad(
        self, gramian: Tensor, blocks: list[_Block]
    ) -> tuple[Tensor, Tensor]:
        betas = golden_ratio_weights(len(blocks), device=gramian.device, dtype=gramian.dtype)
        alpha = gramian.new_zeros(gramian.shape[0])
        for beta, block in zip(betas, blocks, strict=True):
            _, block_alpha = self._solve_block(gramian, block, pcgrad=False)
            index = torch.tensor(block.rows, device=gramian.device)
            alpha.index_copy_(0, index, beta * block_alpha)  # the reference: the last group wins
        alpha = alpha / alpha.sum()
        normalized, inverse_norms = normalize_gramian(gramian, min_norm=_MIN_NORM)
        return pendulum_weights(normalized, inverse_norms, alpha, self.pcgrad), alpha

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "groups": [[g.name, list(g.tasks), g.lam] for g in self._groups],
            "tasks": None if self._tasks is None else list(self._tasks),
            "step_count": self.step_count,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._groups = tuple(TaskGroup(name, tasks, lam) for name, tasks, lam in state["groups"])
        self.tasks = state["tasks"]
        self.step_count = int(state["step_count"])

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(groups={list(self._initial_groups)!r}, "
            f"auto_group={self.auto_group!r}, regroup_every={self.regroup_every!r}, "
            f"similarity_threshold={self.similarity_threshold!r}, lam={self.lam!r}, "
            f"n_iter={self.n_iter!r}, min_weight_fraction={self.min_weight_fraction!r}, "
            f"pcgrad={self.pcgrad!r}, pcgrad_across_groups={self.pcgrad_across_groups!r})"
        )


def _checked_groups(groups: Sequence[GroupSpec]) -> tuple[TaskGroup, ...]:
    if isinstance(groups, TaskGroup | Mapping | str):
        raise ValueError(f"Attribute `groups` must be a sequence of task groups. Found {groups!r}.")
    checked = tuple(TaskGroup.of(group) for group in groups)
    _check_distinct("groups", [group.name for group in checked])
    return checked


class DynamicK(GramianAggregator, Stateful, NonDifferentiable):
    r"""
    :class:`~torchjd.Stateful` :class:`~torchjd.aggregation.GramianWeightedAggregator` of
    ``golden_pendulum.pro.DynamicK``: Golden Pendulum within groups of named tasks and
    golden-ratio weights across groups. See :class:`DynamicKWeighting` for the maths.

    It computes only the Gramian blocks its weighting reads: :math:`\sum_p k_p^2` inner products
    of :math:`n`-long gradients per call instead of :math:`K^2` (the full Gramian on regrouping
    calls and with ``pcgrad_across_groups``). Through the autogram ``Engine`` or
    ``jac_to_grad(..., optimize_gramian_computation=True)`` the full Gramian is computed by torchjd
    and the weighting reads its blocks.

    .. testcode::

        import torch
        from torchjd.autojac import backward, jac_to_grad
        from torchjd_golden import DynamicK, TaskGroup

        model = torch.nn.Linear(8, 5)
        aggregator = DynamicK(
            groups=[TaskGroup("ranking", ["rank", "returns"]), TaskGroup("risk", ["vol"], lam=0.3)]
        )
        aggregator.tasks = ["rank", "returns", "vol", "mae", "regime"]  # names of the rows
        losses = model(torch.randn(16, 8)).pow(2).mean(dim=0)
        backward(losses)
        jac_to_grad(model.parameters(), aggregator)
        print([group.name for group in aggregator.active_groups])
        print({name: round(w, 3) for name, w in aggregator.group_weights.items()})

    .. testoutput::

        ['ranking', 'risk', '_ungrouped']
        {'ranking': 0.191, 'risk': 0.309, '_ungrouped': 0.5}

    :param groups: The groups (:class:`TaskGroup`, or mappings of their fields), or ``None``.
    :param auto_group: Whether to find the groups by gradient similarity.
    :param regroup_every: Number of calls between two regroupings.
    :param similarity_threshold: The cosine a task needs with every member to join a group.
    :param lam: :math:`\lambda` of the groups that have none.
    :param n_iter: Number of projected-gradient steps of each QP.
    :param min_weight_fraction: Floor of the QP weights within a group.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    :param pcgrad_across_groups: Whether PCGrad runs over all tasks, as the reference.
    """

    gramian_weighting: DynamicKWeighting

    def __init__(
        self,
        groups: Sequence[GroupSpec] | None = None,
        auto_group: bool = False,
        regroup_every: int = 500,
        similarity_threshold: float = 0.5,
        lam: float = 0.5,
        n_iter: int = 25,
        min_weight_fraction: float = 0.02,
        pcgrad: bool = True,
        pcgrad_across_groups: bool = False,
    ) -> None:
        super().__init__(
            DynamicKWeighting(
                groups,
                auto_group=auto_group,
                regroup_every=regroup_every,
                similarity_threshold=similarity_threshold,
                lam=lam,
                n_iter=n_iter,
                min_weight_fraction=min_weight_fraction,
                pcgrad=pcgrad,
                pcgrad_across_groups=pcgrad_across_groups,
            )
        )
        gramian_of = partial(_needed_gramian, self.gramian_weighting)
        self.weighting = weighting_of_matrix(self.gramian_weighting, gramian_of)

    groups = ForwardedConverting[tuple[TaskGroup, ...], Sequence[GroupSpec]](
        DynamicKWeighting.groups
    )
    tasks = ForwardedConverting[TaskNames | None, Sequence[Hashable] | None](
        DynamicKWeighting.tasks
    )
    auto_group = Forwarded(DynamicKWeighting.auto_group)
    regroup_every = Forwarded(DynamicKWeighting.regroup_every)
    similarity_threshold = Forwarded(DynamicKWeighting.similarity_threshold)
    lam = Forwarded(DynamicKWeighting.lam)
    n_iter = Forwarded(DynamicKWeighting.n_iter)
    min_weight_fraction = Forwarded(DynamicKWeighting.min_weight_fraction)
    pcgrad = Forwarded(DynamicKWeighting.pcgrad)
    pcgrad_across_groups = Forwarded(DynamicKWeighting.pcgrad_across_groups)
    alpha = Forwarded[Tensor | None](
        "alpha", "The weights of the normalised gradients of the last call."
    )
    active_groups = Forwarded[tuple[TaskGroup, ...]](
        "active_groups", "The groups of the last call, with their tasks."
    )
    group_weights = Forwarded(DynamicKWeighting.group_weights)

    def add_task(self, task: Hashable, group: str) -> None:
        """See :meth:`DynamicKWeighting.add_task`."""
        self.gramian_weighting.add_task(task, group)

    def remove_task(self, task: Hashable) -> None:
        """See :meth:`DynamicKWeighting.remove_task`."""
        self.gramian_weighting.remove_task(task)

    def reset(self) -> None:
        """See :meth:`DynamicKWeighting.reset`."""
        self.gramian_weighting.reset()


def _needed_gramian(weighting: DynamicKWeighting, matrix: Matrix) -> PSDMatrix:
    """The Gramian of ``matrix`` with only the blocks ``weighting`` reads (zeros elsewhere)."""

    blocks = weighting.gramian_blocks(matrix.shape[0])
    if blocks is None:
        return compute_gramian(matrix)  # type: ignore[return-value]
    m = matrix.shape[0]
    gramian = matrix.new_zeros((m, m), dtype=accumulation_dtype(matrix.dtype))
    for rows, count in _runs(blocks):
        first, size = rows[0], len(rows)
        if count > 1 and accumulation_dtype(matrix.dtype) == matrix.dtype:
            # Equal blocks of consecutive rows: one batched product on a view of the rows, which
            # a BLAS runs much faster than a thin (size x n) @ (n x size) product per block.
            batch = matrix[first : first + count * size].view(count, size, -1)
            products = torch.bmm(batch, batch.transpose(1, 2))
            for k in range(count):
                at = first + k * size
                gramian[at : at + size, at : at + size] = products[k]
        elif rows == list(range(first, first + size)):
            for at in range(first, first + count * size, size):
                block = compute_gramian(matrix[at : at + size])
                gramian[at : at + size, at : at + size] = block
        else:
            index = torch.tensor(rows, device=matrix.device)
            gramian[index.unsqueeze(1), index] = compute_gramian(matrix.index_select(0, index))
    return gramian  # type: ignore[return-value]


def _runs(blocks: list[list[int]]) -> list[tuple[list[int], int]]:
    """
    ``blocks`` as (first block, count) runs: a run is ``count`` blocks of consecutive rows of
    one size, each starting where the previous ends.
    """

    runs: list[tuple[list[int], int]] = []
    for rows in blocks:
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        if runs and contiguous:
            first, count = runs[-1]
            follows = first[0] + count * len(first) == rows[0] and len(first) == len(rows)
            if follows and first == list(range(first[0], first[0] + len(first))):
                runs[-1] = (first, count + 1)
                continue
        runs.append((rows, 1))
    return runs
