r"""
DynamicK, the aggregator: its weighting on the Gramian blocks that the weighting reads, computed
alone (:func:`~._gramian_blocks.block_gramian`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import partial
from typing import ClassVar

from torch import Tensor
from torchjd import Stateful
from torchjd.linalg import Matrix, PSDMatrix

from .._aggregator_bases import (
    Forwarded,
    ForwardedConverting,
    GramianAggregator,
    forwards_hyperparameters,
)
from .._gramian import compute_gramian
from .._tasks import TaskNames
from .._torchjd_compat import NonDifferentiable, weighting_of_matrix
from ._gramian_blocks import block_gramian
from ._groups import GroupSpec, TaskGroup
from ._parameters import DynamicKParameters
from ._weighting import DynamicKWeighting


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
        gramian_of = partial(needed_gramian, self.gramian_weighting)
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


def needed_gramian(weighting: DynamicKWeighting, matrix: Matrix) -> PSDMatrix:
    """The Gramian of ``matrix`` with only the blocks ``weighting`` reads (zeros elsewhere)."""

    # The state first: a reset (a new task count, a state made on the meta device) restarts the
    # regrouping schedule, which decides the blocks.
    weighting._ensure_state((matrix.shape[0],), matrix)
    blocks = weighting.gramian_blocks(matrix.shape[0])
    gramian = compute_gramian(matrix) if blocks is None else block_gramian(matrix, blocks)
    return gramian  # type: ignore[return-value]
