r"""
Curricula: training phases, each with its own tasks, backbone freezing, :math:`\lambda`, PCGrad
switch and learning rate, driving one of this package's aggregators through torchjd.

Reference: ``golden_pendulum.pro.CurriculumScheduler`` and ``Phase`` (``golden-pendulum-mtl``
0.2.0). Unlike the reference, the phase's learning rate (with its warm-up) is applied to an
optimizer's parameter groups when one is given (the reference only reports it), freezing does
not depend on passing the model to each call, and one aggregator serves every phase, so its
per-task state follows the tasks by name across phases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchjd.aggregation import Aggregator
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from ..aggregation._golden_pendulum import GoldenPendulum
from ..aggregation._tasks import set_step_inputs
from ..aggregation._validation import check_int
from ._phase import Phase, check_losses_cover, known_tasks
from ._presets import get_preset

logger = logging.getLogger(__name__)

BackboneSpec = nn.Module | Iterable[Tensor] | Callable[[nn.Module], Iterable[Tensor]]


class Curriculum:
    r"""
    Runs training phases in order, each for its number of steps: the losses of the phase's tasks
    go through torchjd (``backward``, or ``mtl_backward`` given the shared features) and
    ``jac_to_grad`` with one aggregator for every phase.

    Entering a phase (on the first :meth:`backward`, then in the :meth:`step` that ends the
    previous one, and in :meth:`load_state_dict`) sets ``requires_grad`` of the backbone's
    parameters to ``not freeze_backbone``, sets the aggregator's ``lam`` and ``pcgrad`` to the
    phase's where it has those properties (:class:`~torchjd_golden.GoldenPendulum`,
    :class:`~torchjd_golden.DynamicK`; an adaptive :math:`\lambda` is left to adapt), sets the
    optimizer's learning rate, and calls ``on_enter(model, phase)``. Each :meth:`backward` tells
    the aggregator the names of the phase's tasks present in the batch (``aggregator.tasks``,
    where it has that property) and their losses (``aggregator.losses``, where it has that
    property), so that stateful aggregators key their state by task name across phases.

    With an optimizer, every parameter group's learning rate is the phase's, rising linearly
    during its warm-up (:meth:`Phase.learning_rate`): it is set on entering a phase and after
    each :meth:`step`, so it is right for the next ``optimizer.step()``.

    **Task names are checked**, so that a phase naming a task no loss carries (``"vol"`` for
    ``"volatility"``) cannot silently leave it untrained. By default every :meth:`backward`
    must give a loss for each of the phase's tasks (losses of other tasks are left out, as they
    belong to other phases). Where a batch may lack a task's loss (a missing label), name every
    task the losses may carry with ``tasks=``: the phases are checked against it when the
    curriculum is made, a loss of another name raises, and a phase's task absent from a batch
    is left out of that step (a batch with none of the phase's tasks gives no gradient).

    .. testcode::

        import torch
        from torch import nn
        from torchjd_golden import Curriculum, Phase

        backbone, heads = nn.Linear(4, 8), nn.ModuleDict({k: nn.Linear(8, 1) for k in "abc"})
        model = nn.ModuleDict({"backbone": backbone, "heads": heads})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        curriculum = Curriculum(
            [
                Phase("joint", tasks={"a", "b"}, steps=2, lr=0.01),
                Phase("heads", {"b", "c"}, steps=2, freeze_backbone=True, lr=0.1, warmup_steps=2),
            ],
            model=model,
            backbone=backbone,
            optimizer=optimizer,
        )
        while not curriculum.is_complete:
            features = backbone(torch.randn(16, 4))
            losses = {k: head(features).pow(2).mean() for k, head in heads.items()}
            curriculum.backward(losses)
            optimizer.step()
            optimizer.zero_grad()
            phase = curriculum.current_phase.name
            print(phase, optimizer.param_groups[0]["lr"], backbone.weight.requires_grad)
            curriculum.step()

    .. testoutput::

        joint 0.01 True
        joint 0.01 True
        heads 0.05 False
        heads 0.1 False

    :param phases: The phases, in order.
    :param aggregator: The aggregator of every phase (by default
        :class:`~torchjd_golden.GoldenPendulum`).
    :param model: The model: its trainable parameters receive the gradients, and callbacks
        receive it.
    :param backbone: The parameters frozen by ``freeze_backbone``: a module, parameters, or a
        function of the model returning them (as the reference's ``backbone_params``).
    :param optimizer: An optimizer whose learning rate follows the phases, or ``None``.
    :param tasks: The name of every task the losses may carry, for batches that lack some
        tasks' losses (missing labels); every phase's tasks must be among them. ``None``: each
        :meth:`backward` must give a loss for each of the phase's tasks.
    """

    def __init__(
        self,
        phases: Sequence[Phase],
        aggregator: Aggregator | None = None,
        *,
        model: nn.Module | None = None,
        backbone: BackboneSpec | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        tasks: Collection[Hashable] | None = None,
    ) -> None:
        if isinstance(phases, Phase) or not phases:
            raise ValueError(
                f"Parameter `phases` must be a non-empty sequence of phases. Found {phases!r}."
            )
        for phase in phases:
            if not isinstance(phase, Phase):
                raise ValueError(f"Parameter `phases` must hold `Phase` objects. Found {phase!r}.")
        self.phases = list(phases)
        self.tasks = known_tasks(tasks, self.phases)
        self.aggregator = GoldenPendulum() if aggregator is None else aggregator
        self.model = model
        self.optimizer = optimizer
        self._backbone: list[Tensor] | Callable[[nn.Module], Iterable[Tensor]] | None
        if backbone is None or (callable(backbone) and not isinstance(backbone, nn.Module)):
            self._backbone = backbone
        else:
            self._backbone = _parameters(backbone)
        self._phase_index = 0
        self._phase_step = 0
        self._global_step = 0
        self._entered = False

    @classmethod
    def from_preset(
        cls,
        name: str,
        aggregator: Aggregator | None = None,
        *,
        model: nn.Module | None = None,
        backbone: BackboneSpec | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        tasks: Collection[Hashable] | None = None,
    ) -> Curriculum:
        """The curriculum of the phases of the preset ``name`` (see :func:`get_preset`)."""

        phases = get_preset(name).phases
        return cls(
            phases, aggregator, model=model, backbone=backbone, optimizer=optimizer, tasks=tasks
        )

    @property
    def current_phase(self) -> Phase:
        """The current phase."""
        if self.is_complete:
            raise RuntimeError("The curriculum is complete: it has no current phase.")
        return self.phases[self._phase_index]

    @property
    def current_phase_name(self) -> str:
        """The current phase's name."""
        return self.current_phase.name

    @property
    def phase_step(self) -> int:
        """The number of steps taken in the current phase."""
        return self._phase_step

    @property
    def current_phase_progress(self) -> float:
        """The fraction of the current phase's steps already taken."""
        return self._phase_step / self.current_phase.steps

    @property
    def global_step(self) -> int:
        """The number of steps taken in all."""
        return self._global_step

    @property
    def total_steps(self) -> int:
        """The number of steps of all phases."""
        return sum(phase.steps for phase in self.phases)

    @property
    def is_complete(self) -> bool:
        """Whether every phase has run all its steps."""
        return self._phase_index >= len(self.phases)

    @property
    def current_lr(self) -> float:
        """The learning rate of the current step, warm-up included."""
        return self.current_phase.learning_rate(self._phase_step)

    def backbone_parameters(self) -> list[Tensor]:
        """The backbone's parameters (none without a backbone, or without the model it needs)."""

        if self._backbone is None:
            return []
        if isinstance(self._backbone, list):
            return self._backbone
        if self.model is None:
            return []
        return _parameters(self._backbone(self.model))

    def enter_phase(self) -> None:
        """Enters the current phase unless it is entered already (see the class docstring)."""

        if self._entered:
            return
        phase = self.current_phase
        logger.info(
            "Entering phase '%s': %d tasks, %d steps, backbone %s, lam=%.2f",
            phase.name,
            len(phase.tasks),
            phase.steps,
            "frozen" if phase.freeze_backbone else "trainable",
            phase.lam,
        )
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(not phase.freeze_backbone)
        for name, value in (("lam", phase.lam), ("pcgrad", phase.pcgrad)):
            if isinstance(getattr(type(self.aggregator), name, None), property):
                setattr(self.aggregator, name, value)
        self.apply_learning_rate()
        if phase.on_enter is not None:
            phase.on_enter(self.model, phase)
        self._entered = True

    def apply_learning_rate(self) -> None:
        """Sets every parameter group's learning rate to :attr:`current_lr` (given an optimizer)."""

        if self.optimizer is None or self.is_complete:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_lr

    def backward(
        self,
        losses: Mapping[Hashable, Tensor],
        *,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> dict[Hashable, Tensor]:
        """
        Fills the ``.grad`` fields of the model's trainable parameters from the losses of the
        current phase's tasks (the others are ignored): ``backward`` and ``jac_to_grad`` over
        those parameters or, given the shared ``features``, ``mtl_backward`` (each head gets its
        own task's gradient) and ``jac_to_grad`` over the shared parameters. With a frozen
        backbone, features that need no gradient share nothing: each head gets its own task's
        gradient and the weights are ones.

        :returns: The weights of the tasks, by name (tensors on the device; empty when no loss
            of the phase's tasks is given, or for an aggregator without weights).
        :raises TypeError: If ``losses`` is not a mapping by task name.
        :raises ValueError: Without ``tasks``, if a task of the phase has no loss; with
            ``tasks``, if a loss is of a task not among them (see the class docstring).
        """

        if self.is_complete:
            raise RuntimeError("The curriculum is complete: no phase is left to train.")
        if not isinstance(losses, Mapping):
            raise TypeError(
                "Parameter `losses` must be a mapping from task name to loss, as the phases name "
                f"their tasks (`dict(zip(names, losses))`). Found {type(losses).__name__}."
            )
        if self.model is None:  # before entering the phase, which freezes the model's backbone
            raise ValueError(
                "`Curriculum.backward` needs the model: pass `model=` or set `.model`."
            )
        self.enter_phase()
        phase = self.current_phase
        check_losses_cover(phase, losses, self.tasks)
        active = {name: loss for name, loss in losses.items() if name in phase.tasks}
        if not active:
            logger.warning(
                "Phase '%s' trains %s but got losses of %s only: no gradient.",
                phase.name,
                sorted(map(str, phase.tasks)),
                sorted(map(str, losses)),
            )
            return {}
        names = tuple(active)
        stacked = torch.stack(list(active.values()))
        aggregator = self.aggregator
        set_step_inputs(aggregator, names, stacked.detach())
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if features is None:
            backward(stacked, inputs=trainable)
            weights = jac_to_grad(trainable, aggregator)
        else:
            features = [features] if isinstance(features, Tensor) else list(features)
            if not any(feature.requires_grad for feature in features):
                torch.autograd.backward(stacked.sum())
                return {name: stacked.new_ones(()) for name in names}
            mtl_backward(list(active.values()), features=features)
            shared = [p for p in trainable if getattr(p, "jac", None) is not None]
            weights = jac_to_grad(shared, aggregator)
        if weights is None:
            return {}
        return dict(zip(names, weights.unbind(), strict=True))

    def step(self) -> bool:
        """
        Counts one training step. When the phase has run all its steps, calls its ``on_exit``
        and enters the next phase. Returns whether the phase changed.
        """

        phase = self.current_phase
        self._phase_step += 1
        self._global_step += 1
        if self._phase_step < phase.steps:
            self.apply_learning_rate()
            return False
        logger.info("Leaving phase '%s' after %d steps", phase.name, self._phase_step)
        if phase.on_exit is not None:
            phase.on_exit(self.model, phase)
        self._phase_index += 1
        self._phase_step = 0
        self._entered = False
        if not self.is_complete:
            self.enter_phase()
        return True

    def state_dict(self) -> dict[str, Any]:
        """
        The position in the curriculum and the aggregator's state: plain values and tensors, so
        ``torch.load(weights_only=True)`` reads it.
        """

        state: dict[str, Any] = {
            "phases": self._phase_signature(),
            "phase_index": self._phase_index,
            "phase_step": self._phase_step,
            "global_step": self._global_step,
        }
        if isinstance(self.aggregator, nn.Module):
            state["aggregator"] = self.aggregator.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """
        Resumes at the saved position and enters the phase again (freezing, :math:`\\lambda`,
        learning rate and ``on_enter``, which may set up what a new process lacks): at once when
        the curriculum has its model, else in the next :meth:`backward`.

        Entering at once makes the first forward pass after resuming run with the phase's frozen
        backbone, as the uninterrupted run's did (it entered the phase in the :meth:`step` before
        it). A forward pass through a backbone frozen only afterwards gives the same gradients
        through another graph, which some CPUs' BLAS kernels round differently.

        :raises ValueError: If the checkpoint is of a curriculum with other phases (names or
            numbers of steps), whose position would mean another point of training here.
        """

        saved = [(str(name), int(steps)) for name, steps in state.get("phases", ())]
        if saved != self._phase_signature():
            raise ValueError(
                "The checkpoint is of a curriculum with other phases: it has "
                f"{saved or 'none saved'}, this curriculum has {self._phase_signature()} "
                "(name, steps). Resume it with the phases it was saved with."
            )
        self.resume_at(state["phase_index"], state["phase_step"], state["global_step"])
        if "aggregator" in state and isinstance(self.aggregator, nn.Module):
            self.aggregator.load_state_dict(state["aggregator"])
        if self.model is not None and not self.is_complete:
            self.enter_phase()

    def resume_at(self, phase_index: int, phase_step: int, global_step: int) -> None:
        """
        Moves to step ``phase_step`` of phase ``phase_index`` (``global_step`` steps in all);
        the next :meth:`backward` enters the phase again. :meth:`load_state_dict` checks the
        phases first.
        """

        self._phase_index = check_int("phase_index", int(phase_index), low=0)
        self._phase_step = check_int("phase_step", int(phase_step), low=0)
        self._global_step = check_int("global_step", int(global_step), low=0)
        self._entered = False

    def _phase_signature(self) -> list[tuple[str, int]]:
        return [(phase.name, phase.steps) for phase in self.phases]

    def __repr__(self) -> str:
        names = [phase.name for phase in self.phases]
        return f"{self.__class__.__name__}(phases={names!r}, aggregator={self.aggregator!r})"


def _parameters(source: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    return list(source.parameters() if isinstance(source, nn.Module) else source)
