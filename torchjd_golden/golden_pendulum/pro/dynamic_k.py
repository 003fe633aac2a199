"""``golden_pendulum.pro.DynamicK`` and ``TaskGroup`` on :class:`torchjd_golden.DynamicK`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ...aggregation import _dynamic_k as native
from .._backward import balanced_backward, single_task_backward, weights_by_name
from .._settings import aggregator_setting


@dataclass
class TaskGroup:
    """
    A group of tasks balanced together, as ``golden_pendulum.pro.TaskGroup`` (a mutable set of
    names; ``weight`` is kept for compatibility and never set, as in the reference).
    """

    name: str
    tasks: set[str] = field(default_factory=set)
    weight: float = 0.0
    lam: float | None = None


class _SharedTasksWeighting(native.DynamicKWeighting):
    """
    The reference lets a task be in several groups (one named in two, or ``add_task`` into a
    second): it takes part in each group's QP and takes the weight of the last. The native class
    refuses such groups.
    """

    _shared_tasks_allowed = True


class _ReferenceDynamicK(native.DynamicK):
    _weighting_class = _SharedTasksWeighting


class DynamicK:
    """
    Golden Pendulum within task groups and golden-ratio weights across them, as
    ``golden_pendulum.pro.DynamicK``, with its numbers: the QPs run per group without PCGrad,
    then PCGrad runs over all tasks, which reads every pair of gradients. (The reference says it
    cuts the :math:`O(K^2)` cost but computes every pair; :class:`torchjd_golden.DynamicK`
    resolves conflicts within groups and computes only their Gramian blocks.)
    """

    def __init__(
        self,
        groups: list[TaskGroup] | None = None,
        auto_group: bool = False,
        regroup_every: int = 500,
        similarity_threshold: float = 0.5,
        lam: float = 0.5,
        n_iter: int = 25,
        min_weight_fraction: float = 0.02,
        pcgrad: bool = True,
    ) -> None:
        self.aggregator: native.DynamicK = _ReferenceDynamicK(
            auto_group=auto_group,
            regroup_every=regroup_every,
            similarity_threshold=similarity_threshold,
            lam=lam,
            n_iter=n_iter,
            min_weight_fraction=min_weight_fraction,
            pcgrad=pcgrad,
            pcgrad_across_groups=True,
        )
        self._groups = groups or []
        self._weight_history: list[dict[str, float]] = []

    auto_group = aggregator_setting(native.DynamicK, "auto_group")
    regroup_every = aggregator_setting(native.DynamicK, "regroup_every")
    similarity_threshold = aggregator_setting(native.DynamicK, "similarity_threshold")
    lam = aggregator_setting(native.DynamicK, "lam")
    n_iter = aggregator_setting(native.DynamicK, "n_iter")
    min_weight_fraction = aggregator_setting(native.DynamicK, "min_weight_fraction")
    pcgrad = aggregator_setting(native.DynamicK, "pcgrad")

    @property
    def current_groups(self) -> list[TaskGroup]:
        """The current groups."""
        return list(self._groups)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        model: nn.Module,
        shared_params: Iterable[Tensor] | None = None,
    ) -> dict[str, float]:
        """Balances the tasks' gradients into ``.grad``; returns the weights by task name."""

        if len(losses) <= 1:
            return single_task_backward(losses)
        aggregator = self.aggregator
        aggregator.groups = [native.TaskGroup(g.name, set(g.tasks), g.lam) for g in self._groups]
        aggregator.tasks = list(losses)
        regroups = aggregator.gramian_weighting.regroups_next_call()
        balanced_backward(losses, model, shared_params, aggregator)
        if regroups:
            self._groups = [TaskGroup(g.name, {str(t) for t in g.tasks}) for g in aggregator.groups]
        alpha = weights_by_name(losses, aggregator.alpha)
        weights = {
            str(name): alpha[str(name)]
            for group in aggregator.active_groups
            for name in group.tasks
        }
        self._weight_history.append(weights)
        return weights

    def add_task(self, task_name: str, group_name: str) -> None:
        """Adds a task to the group named ``group_name`` (a new group if there is none)."""

        for group in self._groups:
            if group.name == group_name:
                group.tasks.add(task_name)
                return
        self._groups.append(TaskGroup(group_name, tasks={task_name}))

    def remove_task(self, task_name: str) -> None:
        """Removes a task from every group."""

        for group in self._groups:
            group.tasks.discard(task_name)
