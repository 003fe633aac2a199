"""
The diagnostics seam of the trainer integrations: a hook on the aggregator's weighting that hands
the step's Gramian and the weights to a recorder, so that diagnostics reuse what the aggregation
computed instead of running another backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torchjd.aggregation import Aggregator

from ._gramian import compute_gramian
from ._monitoring import GramianDiagnostics, gramian_diagnostics, weighting_of
from ._torchjd_compat import GramianWeightingBase


@runtime_checkable
class DiagnosticsRecorder(Protocol):
    """Anything that records a step's Gramian, its weights and the task names."""

    def record(
        self, gramian: Tensor, weights: Tensor, tasks: Sequence[Hashable] | None, /
    ) -> None: ...


class GramianReportRecorder:
    """
    Keeps the :func:`~torchjd_golden.gramian_diagnostics` report of the last step, on device (no
    host read).
    """

    def __init__(self) -> None:
        self.report: GramianDiagnostics | None = None
        self.tasks: Sequence[Hashable] | None = None

    def record(self, gramian: Tensor, weights: Tensor, tasks: Sequence[Hashable] | None, /) -> None:
        self.report = gramian_diagnostics(gramian, weights)
        self.tasks = tasks

    def scalars(self) -> dict[str, Tensor]:
        """The conflict and norm ratios of the last step, as tensors (empty before any)."""

        if self.report is None:
            return {}
        return {"conflict_ratio": self.report.conflict_ratio, "norm_ratio": self.report.norm_ratio}


def attach_recorder(
    aggregator: Aggregator,
    diagnostics: bool | DiagnosticsRecorder,
    tasks: Callable[[], Sequence[Hashable] | None],
) -> DiagnosticsRecorder | None:
    """
    Registers a forward hook on the weighting of ``aggregator`` that calls
    ``recorder.record(gramian, weights, tasks())`` at each aggregation, and returns the recorder
    (``None`` when ``diagnostics`` is ``False``; the default recorder when it is ``True``).

    A Gramian weighting's input is the Gramian already; a weighting of the Jacobian (ExcessMTL,
    GCond, ...) gets it computed from its input, an extra :math:`O(m^2 n)` product per step.
    """

    if diagnostics is False:
        return None
    recorder = GramianReportRecorder() if diagnostics is True else diagnostics
    if not isinstance(recorder, DiagnosticsRecorder):
        raise TypeError(
            "Parameter `diagnostics` must be a bool or an object with a "
            f"`record(gramian, weights, tasks)` method. Found {type(diagnostics).__name__}."
        )
    weighting = weighting_of(aggregator)

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], weights: Tensor) -> None:
        stat = inputs[0].detach()
        gramian = stat if isinstance(module, GramianWeightingBase) else compute_gramian(stat)
        recorder.record(gramian, weights.detach(), tasks())

    weighting.register_forward_hook(hook)
    return recorder
