"""
The diagnostics of the trainer integrations: the diagnostics engine
(:class:`~torchjd_golden.ConflictMonitor`) attached to the aggregator, or a recorder of the
user's, fed by a hook on the aggregator's weighting with the step's Gramian and weights, so that
diagnostics reuse what the aggregation computed instead of running another backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torchjd.aggregation import Aggregator

from ._diagnostics import ConflictMonitor
from ._monitoring import hook_gramian, weighting_of
from ._torchjd_compat import GramianWeightingBase


@runtime_checkable
class DiagnosticsRecorder(Protocol):
    """Anything that records a step's Gramian, its weights and the task names."""

    def record(
        self, gramian: Tensor, weights: Tensor, tasks: Sequence[Hashable] | None, /
    ) -> None: ...


def attach_recorder(
    aggregator: Aggregator,
    diagnostics: bool | DiagnosticsRecorder,
    tasks: Callable[[], Sequence[Hashable] | None],
) -> DiagnosticsRecorder | ConflictMonitor | None:
    """
    With ``diagnostics=True``, attaches a :class:`~torchjd_golden.ConflictMonitor` (the
    diagnostics engine, which reads the task names from the aggregator) and returns it. With a
    recorder, registers a forward hook on the weighting of ``aggregator`` that calls
    ``recorder.record(gramian, weights, tasks())`` at each aggregation, and returns it (an
    aggregator without weights, such as :class:`~torchjd_golden.GCond`, raises a ``TypeError``:
    the monitor records its Gramian alone). With ``False``, returns ``None``.

    A Gramian weighting's input is the Gramian already; a weighting of the Jacobian (ExcessMTL,
    GCond's, ...) gets it computed from its input, an extra :math:`O(m^2 n)` product per step.
    """

    if diagnostics is False:
        return None
    if diagnostics is True:
        monitor = ConflictMonitor()
        monitor.attach(aggregator)
        return monitor
    weighting = weighting_of(aggregator)  # names an aggregator without weights
    recorder = diagnostics
    if not isinstance(recorder, DiagnosticsRecorder):
        raise TypeError(
            "Parameter `diagnostics` must be a bool or an object with a "
            f"`record(gramian, weights, tasks)` method. Found {type(diagnostics).__name__}."
        )

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], weights: Tensor) -> None:
        gramian = hook_gramian(inputs, isinstance(module, GramianWeightingBase))
        recorder.record(gramian, weights.detach(), tasks())

    weighting.register_forward_hook(hook)
    return recorder
