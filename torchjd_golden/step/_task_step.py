"""
What the trainer integrations share: per-task losses in, the step engine
(:class:`~torchjd_golden.JacobianDescent`) accumulating each micro-batch, one aggregation per
optimizer step.

A trainer calls :meth:`JacobianStep.take` on what its model returned (the losses by task name, a
vector, or :class:`TaskLosses` with the shared features), then :meth:`JacobianStep.backward`
once per micro-batch on the loss vector it has scaled (for accumulation, for a ``GradScaler``),
and :meth:`JacobianStep.resolve` once per optimizer step, before clipping and the step. Nothing
here imports a trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.nn.parallel import DistributedDataParallel
from torchjd.aggregation import Aggregator

from ..aggregation._tasks import default_task_names
from ..config import aggregator_from_config
from ..monitoring._conflict_monitor import ConflictMonitor
from ..monitoring._recorder import DiagnosticsRecorder, check_recorder, hook_recorder
from ..monitoring._weighting_calls import weight_scalars
from ._engine import JacobianDescent
from ._parameters import SharedParameters
from ._sharded import GramianSource, check_gramian_source

SharedModules = (
    str | Sequence[str] | nn.Module | Callable[[nn.Module], nn.Module | Iterable[Tensor]] | None
)
"""
The trainers' ``shared`` argument: ``None`` (found from the features at each step), the name of
a submodule or a sequence of names (``"trunk"``), a submodule, or a callable that takes the model
and returns a submodule or parameters; resolved on the model when the step is bound.
"""


@dataclass(frozen=True)
class TaskLosses:
    """
    The per-task losses of a training step, with the shared features when the model has them.

    With ``features`` (the last representation that every task uses), the step is that of
    torchjd's ``mtl_backward``: the task-specific heads get their own gradients and only the
    parameters before ``features`` get a Jacobian to aggregate. Without, that of ``backward``:
    every parameter the losses depend on gets a Jacobian.

    :param losses: The scalar losses, as a mapping from task name to loss, a sequence, or a
        vector (the tasks are then named ``task_0``, ``task_1``, ...).
    :param features: The shared features, a tensor or a sequence of tensors.
    """

    losses: Mapping[Hashable, Tensor] | Sequence[Tensor] | Tensor
    features: Tensor | Sequence[Tensor] | None = None


def configured_source(spec: object, gramian_from: GramianSource) -> tuple[object, GramianSource]:
    """
    The aggregator's spec and the step's source of the weights: a mapping config may carry the
    source beside the method (``{"name": "golden_pendulum", "gramian_from": "features"}``), for
    trainers configured from one file; it agrees with ``gramian_from`` unless that is left at
    ``"parameters"``, its default.
    """

    if not isinstance(spec, Mapping) or "gramian_from" not in spec:
        return spec, gramian_from
    configured = spec["gramian_from"]
    if gramian_from not in ("parameters", configured):
        raise ValueError(
            f"The aggregator's config says gramian_from={configured!r} and the argument "
            f"gramian_from={gramian_from!r}: give it once."
        )
    return {key: value for key, value in spec.items() if key != "gramian_from"}, configured


def build_aggregator(spec: object) -> Aggregator:
    """``spec`` if it is an aggregator, else the one :func:`aggregator_from_config` builds."""

    return spec if isinstance(spec, Aggregator) else aggregator_from_config(spec)


def split_task_losses(output: object) -> tuple[tuple[Hashable, ...], Tensor, Any]:
    """
    The task names, the vector of losses and the features (or ``None``) of a model's output: a
    :class:`TaskLosses`, a mapping with a ``losses`` entry (and maybe ``features``), a mapping
    from task name to loss, a sequence of scalar losses, or a vector.
    """

    features = None
    if isinstance(output, TaskLosses):
        features, output = output.features, output.losses
    elif isinstance(output, Mapping) and "losses" in output:
        features, output = output.get("features"), output["losses"]
    if isinstance(output, Mapping):
        names = tuple(output)
        losses = [output[name] for name in names]
    elif isinstance(output, Tensor):
        vector = output.reshape(-1) if output.ndim == 0 else output
        if vector.ndim != 1:
            raise ValueError(
                "The per-task losses must be a vector, one loss per task. Found a tensor of shape "
                f"{tuple(output.shape)}."
            )
        return default_task_names(vector.shape[0]), vector, features
    elif isinstance(output, Sequence) and not isinstance(output, str):
        names, losses = default_task_names(len(output)), list(output)
    else:
        raise TypeError(
            "The training step must give per-task losses: a mapping from task name to loss, a "
            f"sequence or vector of losses, or TaskLosses. Found {type(output).__name__}."
        )
    if not losses:
        raise ValueError("The training step gave no task loss.")
    for name, loss in zip(names, losses, strict=True):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"The loss of task {name!r} must be a scalar tensor. Found {loss!r}.")
    return names, torch.stack([loss.reshape(()) for loss in losses]), features


def attach_diagnostics(
    aggregator: Aggregator, diagnostics: bool | DiagnosticsRecorder, task_source: object
) -> DiagnosticsRecorder | None:
    """
    The trainers' ``diagnostics`` argument: ``True`` attaches a new
    :class:`~torchjd_golden.ConflictMonitor` (the diagnostics engine) to ``aggregator``, a
    recorder (a :class:`~torchjd_golden.ConflictMonitor` of the caller's included) is attached
    the same way, with the task names read from ``task_source.tasks``; returns it (``None`` for
    ``False``).
    """

    if diagnostics is False:
        return None
    recorder = ConflictMonitor() if diagnostics is True else diagnostics
    hook_recorder(aggregator, check_recorder(recorder, "diagnostics"), task_source=task_source)
    return recorder


class JacobianStep:
    """
    Jacobian descent inside a trainer, on the step engine
    (:class:`~torchjd_golden.JacobianDescent`, the shared parameters named or found from the
    features): each micro-batch is accumulated, one aggregation per optimizer step (so an
    aggregator that accumulates, then resolves, such as GCond, sees the whole step), the task
    names given to the aggregator, and the loss scale of a ``GradScaler`` taken out as
    :func:`~torchjd_golden.with_grad_scaler` does.

    The module given to :meth:`bind` (or :meth:`backward`) is the one the trainer runs: under
    data parallelism the ``DistributedDataParallel`` module, whose ranks then step as one process
    on the global batch; under FSDP2 the ``fully_shard``-ed model, which needs ``shared``.

    :param aggregator: The aggregator, or a name or config for
        :func:`~torchjd_golden.aggregator_from_config`; a mapping config may also hold
        ``gramian_from``.
    :param diagnostics: ``True`` for the diagnostics engine, or a recorder (an object with a
        ``record(gramian, weights=None, *, tasks=None)`` method, as
        :class:`~torchjd_golden.ConflictMonitor`), which then receives the Gramian the
        aggregator's weighting used (or computed from its Jacobian), the weights and the task
        names at each step.
    :param gramian_from: The engine's source of the weights, ``"parameters"`` (exact) or
        ``"features"`` (the feature Gramian, then one ordinary backward pass).
    :param shared: The shared parameters (``SharedModules``): ``None`` finds them from the
        features; a submodule's name, names, or a callable of the model name them, which FSDP2
        needs (its graph holds unsharded parameters that no search can map back).
    """

    def __init__(
        self,
        aggregator: object,
        diagnostics: bool | DiagnosticsRecorder = False,
        gramian_from: GramianSource = "parameters",
        shared: SharedModules = None,
    ) -> None:
        spec, gramian_from = configured_source(aggregator, gramian_from)
        self.aggregator = build_aggregator(spec)
        check_gramian_source(self.aggregator, gramian_from)
        check_shared_modules(shared)
        self.gramian_from: GramianSource = gramian_from
        self.shared = shared
        self.tasks: tuple[Hashable, ...] | None = None
        self.last_weights: Tensor | None = None
        self.aggregated = False  # whether the last resolve aggregated (had a backward pass)
        self.engine: JacobianDescent | None = None  # made for the module at its first backward
        self._features: Any = None
        self._pending = False  # whether a micro-batch waits for the step's resolve
        self.recorder = attach_diagnostics(self.aggregator, diagnostics, task_source=self)

    def take(self, output: object) -> Tensor:
        """
        Reads the per-task losses a model gave and returns them as a vector, keeping the names
        and features for the coming :meth:`backward`.

        :raises ValueError: If the tasks differ from those of the earlier micro-batches of the
            same optimizer step, whose Jacobians would otherwise be added row by row.
        """

        names, losses, features = split_task_losses(output)
        if self._pending and names != self.tasks:
            raise ValueError(
                f"The tasks changed within one optimizer step, from {list(self.tasks or ())} to "
                f"{list(names)}: the micro-batches of a step must give the same tasks."
            )
        self.tasks, self._features = names, features
        return losses

    def backward(self, losses: Tensor, module: nn.Module) -> None:
        """
        Accumulates the micro-batch of ``losses`` (the vector :meth:`take` returned, maybe divided
        by the number of micro-batches and multiplied by a loss scale) into the step of
        ``module``, the model being trained.
        """

        features, self._features = self._features, None
        engine = self.bind(module)
        if features is not None and _detaches_outputs(module):
            raise ValueError(
                "The model is a DistributedDataParallel module with `find_unused_parameters=True`:"
                " it returns its outputs through a node of its own, so the features it returns are"
                " not on the path of the losses computed in its forward pass (their Jacobian would"
                " be zero). Use `find_unused_parameters=False` (Lightning's default; Hugging Face:"
                " `ddp_find_unused_parameters=False`, MultiTaskTrainer's default)."
            )
        vector = losses.reshape(-1)
        named = (
            vector if self.tasks is None else dict(zip(self.tasks, vector.unbind(), strict=True))
        )
        engine.accumulate(named, features=features)
        self._pending = True

    def bind(self, module: nn.Module) -> JacobianDescent:
        """
        The engine of ``module`` (made at the first call, and again when the trainer wraps the
        model anew). Binding before the forward pass lets the exact step tell a
        ``DistributedDataParallel`` module, before it prepares a reduction, that its gradients
        are not reduced by its backward pass.
        """

        if self.engine is None or self.engine.module is not module:
            self.engine = JacobianDescent(
                module,
                self.aggregator,
                shared=resolve_shared_modules(self.shared, module),
                gramian_from=self.gramian_from,
            )
        return self.engine

    def resolve(self, scaler: GradScaler | None = None) -> Tensor | None:
        """
        Aggregates the step's micro-batches into the ``.grad`` fields (with the loss scale taken
        out when ``scaler`` is enabled) and returns the weights, or ``None`` for an aggregator
        without weights (such as GCond, whose update carries momentum) or a step without a
        backward pass (then :attr:`aggregated` is false).
        """

        self.aggregated, self._pending = self._pending, False
        if not self.aggregated:
            return None
        assert self.engine is not None
        self.engine.scaler = scaler
        self.last_weights = self.engine.resolve()
        return self.last_weights

    def weight_scalars(self) -> dict[str, Tensor]:
        """The scalars of the last step's weights by task name (empty without weights)."""

        if self.last_weights is None or self.tasks is None:
            return {}
        alpha = getattr(self.aggregator, "alpha", None)
        alpha = alpha if isinstance(alpha, Tensor) else None
        return weight_scalars(self.last_weights, self.tasks, alpha)


def check_shared_modules(shared: object) -> None:
    """Refuses a ``shared`` argument that is not one of ``SharedModules``."""

    names = [shared] if isinstance(shared, str) else shared
    if shared is None or callable(shared):
        return
    if isinstance(names, Sequence) and names and all(isinstance(n, str) for n in names):
        return
    raise TypeError(
        "Parameter `shared` must be None (found from the features), a submodule or its name, "
        f"a non-empty sequence of names, or a callable of the model. Found {shared!r}."
    )


def resolve_shared_modules(shared: SharedModules, module: nn.Module) -> SharedParameters:
    """
    The engine's ``shared`` for the model ``module`` (inside its ``DistributedDataParallel``
    wrapper, if any): ``"features"`` for ``None``, else the parameters ``shared`` names.
    """

    if shared is None:
        return "features"
    if isinstance(shared, nn.Module):  # listed now, after the trainer's wrapping or sharding
        return shared
    model = module.module if isinstance(module, DistributedDataParallel) else module
    if callable(shared):
        return shared(model)
    names = [shared] if isinstance(shared, str) else list(shared)
    parameters: list[Tensor] = []
    for name in names:
        try:
            submodule = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(
                f"Parameter `shared` names {name!r}, which is not a submodule of the model "
                f"{type(model).__name__}: {error}"
            ) from None
        parameters.extend(submodule.parameters())
    return parameters


def _detaches_outputs(module: nn.Module) -> bool:
    """Whether ``module`` is a DDP module passing its outputs through its unused-parameter sink."""

    return (
        isinstance(module, DistributedDataParallel)
        and module.find_unused_parameters
        and not module.static_graph
    )
