r"""
Task groups: Golden Pendulum within groups of named tasks, golden-ratio weights across them.

Reference: ``golden_pendulum.pro.DynamicK`` and ``TaskGroup`` (``golden-pendulum-mtl`` 0.2.0).
The reference promises to cut the :math:`O(K^2)` cost of the Gram matrix but builds the full
matrix and runs PCGrad over all tasks; here, by default, a call only reads the diagonal blocks of
the Gramian (one per group), and :class:`DynamicK` only computes those.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeAlias

import torch
from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import Matrix, PSDMatrix

from .._aggregator_bases import (
    Forwarded,
    ForwardedConverting,
    GramianAggregator,
    forwards_hyperparameters,
)
from .._golden_pendulum import (
    _MIN_NORM,
    GoldenQPParameters,
    golden_pendulum_weights,
    golden_ratio_weights,
    pendulum_weights,
)
from .._gramian import (
    accumulation_dtype,
    all_finite,
    compute_gramian,
    nan_unless,
    normalize_gramian,
    overflowed,
)
from .._state import LazyState, decoded_task_names
from .._tasks import NamedTasks, TaskNames, check_task_names
from .._torchjd_compat import GramianWeightingBase, NonDifferentiable, weighting_of_matrix
from .._validation import check_bool, check_input, check_int, check_real

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

    :param name: The group's name (not ``"_ungrouped"``, the catch-all group's).
    :param tasks: The names of its tasks: a list or a set of distinct strings or integers (or
        tuples of them), as :attr:`DynamicKWeighting.tasks`.
    :param lam: Its own :math:`\lambda`, or ``None`` for the weighting's.
    """

    name: str
    tasks: tuple[Hashable, ...]
    lam: float | None

    def __init__(self, name: str, tasks: Iterable[Hashable] = (), lam: float | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Attribute `name` must be a non-empty string. Found name={name!r}.")
        if isinstance(tasks, str | bytes):
            raise ValueError(
                f"Attribute `tasks` of a task group must be a list or a set of task names, not the "
                f"string {tasks!r}, which would make a group of its characters. For one task, "
                f"write TaskGroup({name!r}, [{tasks!r}])."
            )
        ordered = ordered_names(tasks)
        _check_distinct("tasks", ordered)
        check_task_names(list(ordered))  # the names a call's rows can have, which checkpoints carry
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


@dataclass(frozen=True)
class _StepCountBounds:
    """
    What the host knows of the step count buffer without reading it: it lies in
    ``[low, high]`` (``high`` is ``None`` when nothing is known). A call counts a step only when
    it is finite, which the host does not read: it widens the interval instead, and reads the
    buffer only when a multiple of ``regroup_every`` falls inside it.
    """

    low: int = 0
    high: int | None = 0

    @property
    def exact(self) -> bool:
        return self.high == self.low

    def may_reach_multiple(self, every: int) -> bool:
        """Whether the count may be a multiple of ``every``."""
        return self.high is None or -(-self.low // every) * every <= self.high

    def after_call(self, finite: bool | None) -> _StepCountBounds:
        """The bounds after a call, whose step is finite, not finite or unknown (``None``)."""
        if finite is None:  # counted or not: only the upper bound moves
            return _StepCountBounds(self.low, None if self.high is None else self.high + 1)
        step = int(finite)
        return _StepCountBounds(self.low + step, None if self.high is None else self.high + step)


class DynamicKParameters(GoldenQPParameters):
    """
    The hyper-parameters of :class:`DynamicKWeighting` and :class:`DynamicK` that only
    configure it (the groups, which regrouping changes, are the weighting's).
    """

    @property
    def regroup_every(self) -> int:
        """Number of steps between two regroupings."""
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


class DynamicKWeighting(
    DynamicKParameters, GramianWeightingBase, NamedTasks, LazyState, NonDifferentiable
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
    :math:`\beta_p`) sum to one (:attr:`alpha`). A task is in one group at most: groups that
    share a task, a group named ``"_ungrouped"`` and :meth:`add_task` of a task that another
    group holds are refused. With one row in all, the weight is 1 (the raw gradient, as
    :class:`GoldenPendulum`).

    **Cost.** Only the blocks :math:`G_{pp}` are read: :math:`\sum_p k_p^2` inner products of
    gradients instead of :math:`K^2`, which :class:`DynamicK` exploits by computing only those
    blocks. Conflicts *between* groups are therefore not resolved. With
    ``pcgrad_across_groups=True`` the weighting does what the reference does instead: the QPs
    run without PCGrad, then PCGrad runs over all normalised gradients with priorities
    :math:`\alpha`, so the full Gramian is read, and :math:`w = S C^\top \alpha`.

    **Automatic groups.** With ``auto_group``, whenever the number of steps is a multiple of
    ``regroup_every`` (and whenever there is no group) the tasks of the call are grouped greedily
    by cosine similarity, as the reference does: in row order, a task starts a group, and each
    later ungrouped task joins it if its cosine with every member is at least
    ``similarity_threshold``. These groups are named ``auto_group_0, ...`` and list their tasks
    sorted. A regrouping call reads the full Gramian and copies its cosines to the host once. The
    other calls read only the blocks and do not synchronise, except that the host reads the step
    count where a regrouping may be due and it cannot tell without it: once in each regrouping
    call (from the second on), and after non-finite steps, which it does not see, once in each
    call from the one that would have regrouped without them to the one that does. Without
    ``auto_group`` no call synchronises.

    **State.** The buffers ``alpha`` (the last finite call's, empty before any call) and
    ``step_count`` (the number of finite steps), the groups (changed by regrouping,
    :meth:`add_task` and :meth:`remove_task`) and :attr:`tasks` travel in ``state_dict`` (the
    groups and names as the module's extra state, a tensor of their JSON, so that
    ``torch.load(weights_only=True)`` reads it). A non-finite Gramian gives NaN weights and
    leaves all of it as it was: it counts no step, does not regroup and keeps :attr:`alpha`
    (unless its number of tasks differs from the last call's: :attr:`alpha` is then NaN).
    Without task names, a change of :math:`m` resets the state with a warning, as
    :meth:`reset` does: the count restarts and the groups are the configured ones (those given
    at construction or last set through :attr:`groups`).

    :param groups: The groups (:class:`TaskGroup`, or mappings of their fields), or ``None``.
    :param auto_group: Whether to find the groups by gradient similarity.
    :param regroup_every: Number of steps between two regroupings.
    :param similarity_threshold: The cosine a task needs with every member to join a group.
    :param lam: :math:`\lambda` of the groups that have none.
    :param n_iter: Number of projected-gradient steps of each QP.
    :param min_weight_fraction: Floor of every :math:`\alpha^{(p)}_k`, as a fraction of
        :math:`1/k_p`.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    :param pcgrad_across_groups: Whether PCGrad runs over all tasks with the hierarchical
        weights, as the reference (reads the full Gramian), instead of within each group.
    """

    _state_names = ("alpha", "step_count")
    # The groups and the task names: a count without its groups would regroup on a wrong schedule.
    _more_state_keys = ("_extra_state",)
    _keeps_state_dtype = True  # alpha is the last call's solution: nothing averages it
    # Whether a task may be in several groups (golden-pendulum-mtl's drop-in allows it, as the
    # reference does; see golden_pendulum.pro.dynamic_k).
    _shared_tasks_allowed: ClassVar[bool] = False
    alpha: Tensor
    step_count: Tensor

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
        self._register_state()
        self._count = _StepCountBounds()
        self._set_hyperparameters(locals())
        self.active_groups: tuple[TaskGroup, ...] = ()

    @property
    def groups(self) -> tuple[TaskGroup, ...]:
        """
        The current groups: the configured ones (given at construction or set here, which
        :meth:`reset` restores), changed by regrouping, :meth:`add_task` and :meth:`remove_task`.
        """
        return self._groups

    @groups.setter
    def groups(self, value: Sequence[GroupSpec] | None) -> None:
        self._configured_groups = self._checked_groups(value or ())
        self._groups = self._configured_groups

    @property
    def auto_group(self) -> bool:
        """Whether the groups are found by gradient similarity."""
        return self._auto_group

    @auto_group.setter
    def auto_group(self, value: bool) -> None:
        self._auto_group = check_bool("auto_group", value)
        # Without auto_group the calls do not follow the count on the host: read it when needed.
        self._count = _StepCountBounds(0, None)

    @property
    def group_weights(self) -> dict[str, float]:
        """The golden weight :math:`\\beta_p` of each group of the last call, by group name."""
        if not self.active_groups:
            return {}
        weights = golden_ratio_weights(len(self.active_groups), dtype=torch.float64).tolist()
        return {group.name: w for group, w in zip(self.active_groups, weights, strict=True)}

    def add_task(self, task: Hashable, group: str) -> None:
        """
        Adds ``task`` at the end of the group named ``group`` (a new group if none is). A task
        that another group holds is refused: take it out with :meth:`remove_task` first.
        """

        groups = list(self._groups)
        for index, existing in enumerate(groups):
            if existing.name == group:
                if task not in existing.tasks:
                    groups[index] = TaskGroup(group, (*existing.tasks, task), existing.lam)
                break
        else:
            groups.append(TaskGroup(group, (task,)))
        self._groups = self._checked_groups(groups)

    def remove_task(self, task: Hashable) -> None:
        """Removes ``task`` from every group (a group left empty stays, and is skipped)."""

        self._groups = tuple(
            TaskGroup(g.name, tuple(t for t in g.tasks if t != task), g.lam) for g in self._groups
        )

    def reset(self) -> None:
        """Restores the configured groups and forgets the steps and :attr:`alpha`."""

        super().reset()
        self._restart()

    def _restart(self) -> None:
        self._groups = self._configured_groups
        self._count = _StepCountBounds()
        self.active_groups = ()

    def _build(
        self, sizes: tuple[int, ...], like: Tensor, names: tuple[Hashable, ...] | None
    ) -> None:
        if self._has_state:  # a reset (new task count, or a state made on the meta device)
            self._restart()
        super()._build(sizes, like, names)
        self._count = _StepCountBounds()

    def _initial_state(self, sizes: tuple[int, ...], like: Tensor) -> dict[str, Tensor]:
        (n_tasks,) = sizes
        return {
            # The targets the QPs start from, as AdaptiveGoldenPendulum's alpha before any step.
            "alpha": golden_ratio_weights(
                n_tasks, device=like.device, dtype=accumulation_dtype(like.dtype)
            ),
            "step_count": torch.zeros((), dtype=torch.int64, device=like.device),
        }

    def regroups_next_call(self) -> bool:
        """
        Whether the next call finds new groups (and so reads the full Gramian). With
        ``auto_group``, this may read the step count on the host (see the class's docstring).
        """

        if not self.auto_group:
            return False
        if not self._groups or not self._has_state or self._state_without_values:
            return True  # (no step yet, or none that a state without values can tell)
        if not self._count.exact and self._count.may_reach_multiple(self.regroup_every):
            count = int(self.step_count)  # the one host read of the schedule
            self._count = _StepCountBounds(count, count)
        return self._count.exact and self._count.low % self.regroup_every == 0

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
        working = gramian.to(accumulation_dtype(gramian.dtype))
        self._ensure_state((m,), working)
        names = self._row_names(m)
        finite = all_finite(working)
        regrouped: bool | None = None  # (None: no regrouping, the host did not read finite)
        if m > 1 and working.device.type != "meta" and self.regroups_next_call():
            regrouped = self._regroup(working, names)
        if m == 1:
            alpha = torch.ones_like(working[0])
            weights = alpha
            self.active_groups = (TaskGroup(CATCH_ALL, names),)
        else:
            blocks = self._blocks(names)
            self.active_groups = tuple(
                TaskGroup(b.group.name, [names[r] for r in b.rows], b.group.lam) for b in blocks
            )
            if self.pcgrad_across_groups:
                weights, alpha = self._weights_with_global_pcgrad(working, blocks)
            else:
                weights, alpha = self._weights_within_groups(working, blocks)

        if self.alpha.shape != alpha.shape:  # named tasks came or went: the last call's solution
            with torch.inference_mode(False):  # a normal tensor, that later calls update in place
                self.alpha = nan_unless(finite, alpha).to(self.alpha.dtype)
        self._commit(finite, alpha=alpha, step_count=self.step_count + 1)
        if self.auto_group:  # (only then: a Python number changing every call would make
            # torch.compile recompile)
            self._count = self._count.after_call(regrouped)
        return nan_unless(finite, weights).to(gramian.dtype)

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

    def _regroup(self, gramian: Tensor, names: tuple[Hashable, ...]) -> bool:
        """Groups the tasks by their cosines if ``gramian`` is finite; returns whether it is."""

        cosine, _ = normalize_gramian(gramian, min_norm=_MIN_NORM)
        finite = all_finite(gramian).to(cosine.dtype).reshape(1)
        read = torch.cat([finite, cosine.flatten()]).tolist()  # the one host read of a regrouping
        if not read[0]:
            return False
        m = len(names)
        values = [read[1 + i * m : 1 + (i + 1) * m] for i in range(m)]
        unassigned = list(range(m))
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
        return True

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
            weights.index_copy_(0, index, beta * block_weights)
            alpha.index_copy_(0, index, beta * block_alpha)
        return weights, alpha

    def _weights_with_global_pcgrad(
        self, gramian: Tensor, blocks: list[_Block]
    ) -> tuple[Tensor, Tensor]:
        betas = golden_ratio_weights(len(blocks), device=gramian.device, dtype=gramian.dtype)
        alpha = gramian.new_zeros(gramian.shape[0])
        for beta, block in zip(betas, blocks, strict=True):
            _, block_alpha = self._solve_block(gramian, block, pcgrad=False)
            index = torch.tensor(block.rows, device=gramian.device)
            # A task in several groups (the drop-in's) takes the last one's, as the reference.
            alpha.index_copy_(0, index, beta * block_alpha)
        alpha = alpha / alpha.sum()
        normalized, inverse_norms = normalize_gramian(gramian, min_norm=_MIN_NORM)
        return pendulum_weights(normalized, inverse_norms, alpha, self.pcgrad), alpha

    def _checked_groups(self, groups: Sequence[GroupSpec]) -> tuple[TaskGroup, ...]:
        if isinstance(groups, TaskGroup | Mapping | str):
            raise ValueError(
                f"Attribute `groups` must be a sequence of task groups. Found {groups!r}."
            )
        checked = tuple(TaskGroup.of(group) for group in groups)
        _check_distinct("groups", [group.name for group in checked])
        if any(group.name == CATCH_ALL for group in checked):
            raise ValueError(
                f"Attribute `groups` must not hold a group named {CATCH_ALL!r}, the name of the "
                "group of the tasks that no group lists. Rename it."
            )
        if not self._shared_tasks_allowed:
            _check_disjoint(checked)
        return checked

    def get_extra_state(self) -> Tensor:
        # JSON in a uint8 tensor: every value of the state_dict is a tensor, as the buffers.
        state = {
            "groups": [[g.name, list(g.tasks), g.lam] for g in self._groups],
            "tasks": None if self._tasks is None else list(self._tasks),
        }
        return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Tensor) -> None:
        if not isinstance(state, Tensor):
            raise ValueError(  # (unreleased versions kept the count as a Python number)
                f"This checkpoint of `{self.__class__.__name__}` holds its groups, task names and "
                "number of calls as plain values, without the state buffers: it was written "
                "before the state moved to buffers and cannot be resumed. Set `groups` and "
                f"`tasks` from it by hand: {state!r}."
            )
        decoded = json.loads(bytes(state.tolist()))
        self._groups = self._checked_groups(
            [
                TaskGroup(name, decoded_task_names(tasks), lam)
                for name, tasks, lam in decoded["groups"]
            ]
        )
        self.tasks = None if decoded["tasks"] is None else decoded_task_names(decoded["tasks"])
        self._count = _StepCountBounds(0, None)  # read from the loaded buffer when needed

    def _shown_value(self, name: str) -> object:
        # The configured groups, as given (regrouping, add_task and remove_task change the current).
        return list(self._configured_groups) if name == "groups" else super()._shown_value(name)


def _check_disjoint(groups: Sequence[TaskGroup]) -> None:
    owner: dict[Hashable, str] = {}
    for group in groups:
        for task in group.tasks:
            if task in owner:
                raise ValueError(
                    f"Attribute `groups` must give each task one group at most, but task {task!r} "
                    f"is in groups {owner[task]!r} and {group.name!r}. Take it out of one (with "
                    "`remove_task` to move it)."
                )
            owner[task] = group.name


@forwards_hyperparameters
class DynamicK(DynamicKParameters, GramianAggregator, Stateful, NonDifferentiable):
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
    :param regroup_every: Number of steps between two regroupings.
    :param similarity_threshold: The cosine a task needs with every member to join a group.
    :param lam: :math:`\lambda` of the groups that have none.
    :param n_iter: Number of projected-gradient steps of each QP.
    :param min_weight_fraction: Floor of the QP weights within a group.
    :param pcgrad: Whether to resolve conflicts with PCGrad.
    :param pcgrad_across_groups: Whether PCGrad runs over all tasks, as the reference.
    """

    gramian_weighting: DynamicKWeighting
    _weighting_class: ClassVar[type[DynamicKWeighting]] = DynamicKWeighting

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
        super().__init__(self._weighting_class.from_arguments(locals()))
        gramian_of = partial(_needed_gramian, self.gramian_weighting)
        self.weighting = weighting_of_matrix(self.gramian_weighting, gramian_of)

    groups = ForwardedConverting[tuple[TaskGroup, ...], Sequence[GroupSpec] | None](
        DynamicKWeighting.groups
    )
    tasks = ForwardedConverting[TaskNames | None, Sequence[Hashable] | None](
        DynamicKWeighting.tasks
    )
    auto_group = Forwarded(DynamicKWeighting.auto_group)
    alpha = Forwarded[Tensor](
        "alpha",
        "The weights of the normalised gradients of the last finite call (empty before any call).",
    )
    active_groups = Forwarded[tuple[TaskGroup, ...]](
        "active_groups", "The groups of the last call, with their tasks."
    )
    group_weights = Forwarded(DynamicKWeighting.group_weights)
    known_tasks = Forwarded(DynamicKWeighting.known_tasks)

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

    # The state first: a reset (a new task count, a state made on the meta device) restarts the
    # regrouping schedule, which decides the blocks.
    weighting._ensure_state((matrix.shape[0],), matrix)
    blocks = weighting.gramian_blocks(matrix.shape[0])
    if blocks is None:
        return compute_gramian(matrix)  # type: ignore[return-value]
    # (the first row of a block of consecutive rows, or the rows of another block; its products)
    pieces: list[tuple[int | Tensor, Tensor]] = []
    for rows, count in _runs(blocks):
        first, size = rows[0], len(rows)
        if count > 1 and accumulation_dtype(matrix.dtype) == matrix.dtype:
            # Equal blocks of consecutive rows: one batched product on a view of the rows, which
            # a BLAS runs much faster than a thin (size x n) @ (n x size) product per block.
            batch = matrix[first : first + count * size].view(count, size, -1)
            products = torch.bmm(batch, batch.transpose(1, 2))
            if matrix.dtype != torch.float64 and overflowed(products, batch):
                # As compute_gramian: the products of finite rows in float64, on the host path.
                batch = batch.double()
                products = torch.bmm(batch, batch.transpose(1, 2))
            pieces.extend((first + k * size, products[k]) for k in range(count))
        elif rows == list(range(first, first + size)):
            for at in range(first, first + count * size, size):
                pieces.append((at, compute_gramian(matrix[at : at + size])))
        else:
            index = torch.tensor(rows, device=matrix.device)
            pieces.append((index, compute_gramian(matrix.index_select(0, index))))
    m = matrix.shape[0]
    dtype = (
        torch.float64 if any(b.dtype == torch.float64 for _, b in pieces) else pieces[0][1].dtype
    )
    gramian = matrix.new_zeros((m, m), dtype=dtype)
    for where, block in pieces:
        if isinstance(where, int):
            gramian[where : where + block.shape[0], where : where + block.shape[0]] = block
        else:
            gramian[where.unsqueeze(1), where] = block.to(dtype)
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
