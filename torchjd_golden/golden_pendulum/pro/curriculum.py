"""``golden_pendulum.pro.CurriculumScheduler`` on :class:`torchjd_golden.Curriculum`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from ...schedule import Curriculum, Phase
from ..core import GoldenPendulumMTL

logger = logging.getLogger(__name__)


class CurriculumScheduler:
    """
    Training phases with their own tasks, backbone freezing, :math:`\\lambda` and PCGrad switch,
    as ``golden_pendulum.pro.CurriculumScheduler``, with its behaviour: each phase has its own
    :class:`~torchjd_golden.golden_pendulum.GoldenPendulumMTL`; the backbone is frozen or
    unfrozen only when a phase is entered in a call given the model; :attr:`current_lr` is
    reported, never applied. (:class:`torchjd_golden.Curriculum` applies the learning rate to an
    optimizer and freezes without needing the model at each call.)

    :param phases: The phases, in order.
    :param backbone_params: A function of the model returning the backbone's parameters.
    """

    def __init__(
        self,
        phases: list[Phase],
        backbone_params: Callable[[nn.Module], Iterable[Tensor]] | None = None,
    ) -> None:
        if not phases:
            raise ValueError("At least one phase is required")
        self.phases = phases
        self._curriculum = Curriculum(phases, backbone=backbone_params)
        self._balancers = {
            phase.name: GoldenPendulumMTL(
                n_tasks=len(phase.tasks), lam=phase.lam, pcgrad=phase.pcgrad
            )
            for phase in phases
        }

    @property
    def current_phase(self) -> Phase:
        """The current phase."""
        return self._curriculum.current_phase

    @property
    def current_phase_name(self) -> str:
        """The current phase's name."""
        return self._curriculum.current_phase_name

    @property
    def current_phase_progress(self) -> float:
        """The fraction of the current phase's steps already taken."""
        return self._curriculum.current_phase_progress

    @property
    def global_step(self) -> int:
        """The number of steps taken in all."""
        return self._curriculum.global_step

    @property
    def total_steps(self) -> int:
        """The number of steps of all phases."""
        return self._curriculum.total_steps

    @property
    def is_complete(self) -> bool:
        """Whether every phase has run."""
        return self._curriculum.is_complete

    @property
    def current_lr(self) -> float:
        """The current phase's learning rate, warm-up included (reported, not applied)."""
        return self._curriculum.current_lr

    def backward(
        self,
        losses: Mapping[str, Tensor],
        model: nn.Module,
        shared_params: Iterable[Tensor] | None = None,
    ) -> dict[str, float]:
        """Golden Pendulum over the losses of the current phase's tasks (the others are left)."""

        if self.is_complete:
            raise RuntimeError("Curriculum is complete — no more phases")
        self._curriculum.model = model
        self._curriculum.enter_phase()
        phase = self.current_phase
        active = {name: loss for name, loss in losses.items() if name in phase.tasks}
        if not active:
            logger.warning(
                "Phase '%s' expects tasks %s but got %s — no active losses",
                phase.name,
                phase.tasks,
                list(losses),
            )
            return {}
        balancer = self._balancers[phase.name]
        balancer.n_tasks = 0  # as the reference: a batch may miss some of the phase's tasks
        return balancer.backward(active, model, shared_params=shared_params)

    def step(self, model: nn.Module | None = None) -> bool:
        """Counts a step; returns whether the phase changed (freezing only given ``model``)."""

        self._curriculum.model = model
        return self._curriculum.step()

    def state_dict(self) -> dict[str, int]:
        """The position in the curriculum."""

        state = self._curriculum.state_dict()
        return {
            "phase_idx": state["phase_index"],
            "phase_step": state["phase_step"],
            "global_step": state["global_step"],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """
        Resumes at the saved position; the next :meth:`backward` enters the phase again. As the
        reference, the phases are not checked (:meth:`torchjd_golden.Curriculum.load_state_dict`
        refuses a checkpoint of other phases).
        """

        self._curriculum.resume_at(state["phase_idx"], state["phase_step"], state["global_step"])
