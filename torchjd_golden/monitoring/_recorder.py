"""
The one contract of every diagnostics recorder (:class:`~torchjd_golden.ConflictMonitor`, or a
recorder of the user's), and the forward hook that feeds one from an aggregator's weighting with
the Gramian and the weights of each call, so that diagnostics reuse what the aggregation
computed instead of running another backward pass.

The hook is an object of a module-level class, not a closure, so that a module carrying it can
be pickled, deep-copied and ``torch.save``-d: the copy's hook records into the copy's recorder.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence
from typing import Protocol, cast, runtime_checkable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchjd.aggregation import Aggregator, WeightedAggregator

from ..aggregation._torchjd_compat import GramianWeightingBase
from ._weighting_calls import hook_alpha, hook_gramian, weighting_of


@runtime_checkable
class DiagnosticsRecorder(Protocol):
    """
    Anything that records a training step from its Gramian :math:`G = J J^\\top`, the step's
    task weights and the names of its tasks (one per row), as
    :meth:`ConflictMonitor.record <torchjd_golden.ConflictMonitor.record>` does.
    """

    def record(
        self,
        gramian: Tensor,
        weights: Tensor | None = None,
        *,
        tasks: Sequence[Hashable] | None = None,
    ) -> None: ...


class RecordingHook:
    """
    A forward hook on a weighting that calls ``recorder.record(gramian, weights, tasks=names)`` at
    each call: the Gramian the weighting took (or the one of the Jacobian it took, an
    :math:`O(m^2 n)` product), the weights the method reports (the QP solution ``alpha`` for
    the Golden Pendulum family and :class:`~torchjd_golden.DynamicK`, as golden-pendulum-mtl
    reports them; the returned weights otherwise) and the task names: the ``tasks`` of
    ``task_source`` (by default the hooked weighting), ``None`` where it has none.

    :param recorder: The recorder.
    :param gramian_input: Whether the hooked weighting takes the Gramian (else the Jacobian).
    :param task_source: The object whose ``tasks`` name the rows, or ``None`` for the weighting.
    """

    def __init__(
        self,
        recorder: DiagnosticsRecorder,
        *,
        gramian_input: bool,
        task_source: object | None = None,
    ) -> None:
        self.recorder = recorder
        self.gramian_input = gramian_input
        self.task_source = task_source

    def __call__(
        self, module: nn.Module, inputs: tuple[Tensor, ...], weights: Tensor | None = None
    ) -> None:
        reported = None
        if weights is not None:  # a forward hook on a weighting (else a pre-hook: no weights)
            alpha = hook_alpha(module, weights)
            reported = (weights if alpha is None else alpha).detach()
        gramian = hook_gramian(inputs, self.gramian_input)
        self.recorder.record(gramian, reported, tasks=self._tasks(module))

    def _tasks(self, module: nn.Module) -> Sequence[Hashable] | None:
        source = module if self.task_source is None else self.task_source
        return getattr(source, "tasks", None)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.recorder!r})"


def hook_recorder(
    target: nn.Module, recorder: object, *, task_source: object | None = None
) -> RemovableHandle:
    """
    Registers a :class:`RecordingHook` feeding ``recorder`` on the weighting of ``target`` (a
    torchjd ``WeightedAggregator``, ours included, or a Gramian weighting) that gives its
    weights. Returns the hook's handle: ``handle.remove()`` detaches it.

    :raises TypeError: If ``recorder`` has no ``record(gramian, weights, *, tasks)`` method, or
        ``target`` combines the rows without a weighting.
    """

    checked = check_recorder(recorder, "recorder")
    if isinstance(target, Aggregator) and not isinstance(target, WeightedAggregator):
        # No weights (GCond's update, with its momentum, combines no rows): the Gramian of the
        # Jacobian it aggregates, recorded before the call.
        hook = RecordingHook(checked, gramian_input=False, task_source=task_source)
        return target.register_forward_pre_hook(hook)
    weighting = target if isinstance(target, GramianWeightingBase) else weighting_of(target)
    hook = RecordingHook(
        checked,
        gramian_input=isinstance(weighting, GramianWeightingBase),
        task_source=task_source,
    )
    return weighting.register_forward_hook(hook)


def check_recorder(recorder: object, parameter: str) -> DiagnosticsRecorder:
    """
    ``recorder``, checked to have a ``record`` method that takes ``(gramian, weights, *,
    tasks)``: a mismatch raises here, naming ``parameter``, not at the first training step.
    """

    record = getattr(recorder, "record", None)
    expected = "an object with a method `record(gramian, weights=None, *, tasks=None)`"
    if not callable(record):
        raise TypeError(
            f"Parameter `{parameter}` must be {expected}. Found {type(recorder).__name__}."
        )
    try:
        signature = inspect.signature(record)
    except ValueError:  # a callable without a signature to read: it is trusted
        return cast(DiagnosticsRecorder, recorder)
    try:
        signature.bind(None, None, tasks=None)
    except TypeError:
        raise TypeError(
            f"Parameter `{parameter}` must be {expected}. Found {type(recorder).__name__} with "
            f"`record{_unannotated(signature)}`."
        ) from None
    return cast(DiagnosticsRecorder, recorder)


def _unannotated(signature: inspect.Signature) -> inspect.Signature:
    empty = inspect.Parameter.empty
    parameters = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return signature.replace(parameters=parameters, return_annotation=empty)
