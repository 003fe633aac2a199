"""The hyper-parameters of DynamicK that only configure it, validated."""

from __future__ import annotations

from .._golden_pendulum import GoldenQPParameters
from .._validation import check_bool, check_int, check_real


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
