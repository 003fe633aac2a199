r"""
DynamicK's weighting: Golden Pendulum within groups of named tasks, golden-ratio weights across
them.

Reference: ``golden_pendulum.pro.DynamicK`` and ``TaskGroup`` (``golden-pendulum-mtl`` 0.2.0).
The reference promises to cut the :math:`O(K^2)` cost of the Gram matrix but builds the full
matrix and runs PCGrad over all tasks; here, by default, a call only reads the diagonal blocks of
the Gramian (one per group), and :class:`DynamicK` only computes those.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torchjd.linalg import PSDMatrix

from .._golden_pendulum import (
    _MIN_NORM,
    golden_pendulum_weights,
    golden_ratio_weights,
    pendulum_weights,
)
from .._gramian import accumulation_dtype, all_finite, nan_unless, normalize_gramian
from .._state import LazyState
from .._tasks import NamedTasks
from .._torchjd_compat import GramianWeightingBase, NonDifferentiable
from .._validation import check_bool, check_input
from ._groups import (
    CATCH_ALL,
    Block,
    GroupSpec,
    TaskGroup,
    blocks_of,
    checked_groups,
    decoded_groups,
    encoded_groups,
)
from ._parameters import DynamicKParameters
from ._regrouping import StepCountBounds, similarity_groups


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
        self._count = StepCountBounds()
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
        self._count = StepCountBounds(0, None)

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
        self._count = StepCountBounds()
        self.active_groups = ()

    def _build(
        self, sizes: tuple[int, ...], like: Tensor, names: tuple[Hashable, ...] | None
    ) -> None:
        if self._has_state:  # a reset (new task count, or a state made on the meta device)
            self._restart()
        super()._build(sizes, like, names)
        self._count = StepCountBounds()

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
            self._count = StepCountBounds(count, count)
        return self._count.exact and self._count.low % self.regroup_every == 0

    def gramian_blocks(self, n_tasks: int) -> list[list[int]] | None:
        """
        The sets of rows whose Gramian block the next call with ``n_tasks`` rows reads, or
        ``None`` when it reads the whole Gramian (regrouping, or PCGrad across groups). The
        aggregator computes only these blocks.
        """

        if n_tasks == 1 or self.pcgrad_across_groups or self.regroups_next_call():
            return None
        return [list(block.rows) for block in blocks_of(self._groups, self._row_names(n_tasks))]

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
            blocks = blocks_of(self._groups, names)
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

    def _regroup(self, gramian: Tensor, names: tuple[Hashable, ...]) -> bool:
        """Groups the tasks by their cosines if ``gramian`` is finite; returns whether it is."""

        cosine, _ = normalize_gramian(gramian, min_norm=_MIN_NORM)
        finite = all_finite(gramian).to(cosine.dtype).reshape(1)
        read = torch.cat([finite, cosine.flatten()]).tolist()  # the one host read of a regrouping
        if not read[0]:
            return False
        m = len(names)
        cosines = [read[1 + i * m : 1 + (i + 1) * m] for i in range(m)]
        self._groups = similarity_groups(cosines, names, self.similarity_threshold)
        return True

    def _solve_block(self, gramian: Tensor, block: Block, pcgrad: bool) -> tuple[Tensor, Tensor]:
        """Golden Pendulum on the block of ``gramian``: weights on its rows and QP solution."""

        index = torch.tensor(block.rows, device=gramian.device)
        sub = gramian.index_select(0, index).index_select(1, index)
        if len(block.rows) == 1:
            _, inverse_norm = normalize_gramian(sub, min_norm=_MIN_NORM)
            return inverse_norm, torch.ones_like(inverse_norm)
        lam = self.lam if block.group.lam is None else block.group.lam
        return golden_pendulum_weights(sub, lam, self.n_iter, self.min_weight_fraction, pcgrad)

    def _weights_within_groups(self, gramian: Tensor, blocks: list[Block]) -> tuple[Tensor, Tensor]:
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
        self, gramian: Tensor, blocks: list[Block]
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
        return checked_groups(groups, self._shared_tasks_allowed)

    def get_extra_state(self) -> Tensor:
        # JSON in a uint8 tensor: every value of the state_dict is a tensor, as the buffers.
        return encoded_groups(self._groups, self._tasks)

    def set_extra_state(self, state: Tensor) -> None:
        if not isinstance(state, Tensor):
            raise ValueError(  # (unreleased versions kept the count as a Python number)
                f"This checkpoint of `{self.__class__.__name__}` holds its groups, task names and "
                "number of calls as plain values, without the state buffers: it was written "
                "before the state moved to buffers and cannot be resumed. Set `groups` and "
                f"`tasks` from it by hand: {state!r}."
            )
        self._groups, self.tasks = decoded_groups(state, self._shared_tasks_allowed)
        self._count = StepCountBounds(0, None)  # read from the loaded buffer when needed

    def _shown_value(self, name: str) -> object:
        # The configured groups, as given (regrouping, add_task and remove_task change the current).
        return list(self._configured_groups) if name == "groups" else super()._shown_value(name)
