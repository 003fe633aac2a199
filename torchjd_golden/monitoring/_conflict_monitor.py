r"""
A diagnostics engine over a rolling window of training steps, fed by the Gramian the aggregator
already computed.

Reference: ``golden_pendulum.pro.DiagnosticsEngine`` and ``ConflictReport`` (``golden-pendulum-mtl``
0.2.0), which runs one extra backward pass per task at every step to get the gradients it
analyses, and reads every value on the host as it goes. Here the statistics of a step are
computed from the :math:`m \times m` Gramian (no backward pass, no :math:`n`-long vector) and kept
as tensors on its device until a report, the alerts or the summary are read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..aggregation._golden_pendulum import golden_ratio_weights
from ..aggregation._tasks import NamedTasks, check_task_names
from ..aggregation._validation import check_bool, check_int, check_real
from ._conflict_report import (
    STATISTICS,
    ConflictReport,
    alert_messages,
    conflicting_pairs,
    statistics_of,
    summary_text,
)
from ._gramian_diagnostics import conflict_statistics
from ._recorder import hook_recorder

# As the reference: gradients are divided by max(norm, 1e-8), the smallest norm is clamped at
# 1e-10 in the norm ratio (conflict_statistics), a constant weight series (variance below 1e-10)
# has no resonance, and the resonance is the largest |autocorrelation| at lags 2 to 20 of the
# last 100 weights of the window's first task, once the window holds 50 weight records.
_MIN_NORM = 1e-8
_MIN_VARIANCE = 1e-10
_RESONANCE_SPAN = 100
_RESONANCE_MIN_RECORDS = 50
_RESONANCE_LAGS = range(2, 21)
_SUMMARY_SPAN = 10


class ConflictMonitor(NamedTasks):
    r"""
    Gradient-conflict diagnostics of a training run, from the Gramians its aggregator computes:
    the engine of ``golden_pendulum.pro.DiagnosticsEngine`` without its extra backward pass.

    Each recorded step keeps, on the Gramian's device, with :math:`\hat G` the Gramian of the
    gradients divided by :math:`\max(\|J_k\|, 10^{-8})` and :math:`w` the last recorded weights:

    - the conflict ratio: the fraction of pairs :math:`i < j` with :math:`\hat G_{ij} < 0`;
    - the norm ratio :math:`\max_k \|J_k\| / \max(\min_k \|J_k\|, 10^{-10})`;
    - the deviation :math:`\|w - \alpha^\varphi\|_2` from the golden targets and the balance
      :math:`w_{\min} / w_{\max}`;
    - the resonance score: once 50 weight vectors are recorded, the largest absolute
      autocorrelation :math:`\sum_t (s_t - \bar s)(s_{t-\ell} - \bar s) / (L \sigma^2)` at lags
      :math:`\ell = 2, \dots, 20` of the series :math:`s` of the last :math:`L \leq 100` weights of
      the first task of the window's oldest weights (0 if :math:`\sigma^2 < 10^{-10}`), capped
      at 1.

    Nothing is read on the host while recording: :meth:`report`, :attr:`alerts`,
    :meth:`summary` and :meth:`history` read what they need when called. The alerts (and their
    thresholds) are the reference's: conflict ratio above ``alert_conflict_ratio``, norm ratio
    above ``alert_norm_ratio``, a positive balance below ``alert_balance_floor``, resonance
    above 0.7.

    **Feeding it.** :meth:`attach` hooks it onto an aggregator: each call records the Gramian
    the aggregator computed and the weights of that call (the QP solution ``alpha`` for the
    Golden Pendulum family and :class:`~torchjd_golden.DynamicK`, the returned weights
    otherwise). For an aggregator of the Jacobian itself (ExcessMTL, GCond, torchjd's
    ``WeightedAggregator``) the Gramian is computed from the Jacobian, at :math:`O(m^2 n)`; an
    aggregator without weights (:class:`~torchjd_golden.GCond`, whose update carries momentum)
    records its Gramian only. Or
    call :meth:`record` with a Gramian (and weights), and :meth:`record_weights` for weights
    alone, as the reference's ``analyze`` and ``record_weights``. Attached to
    :class:`~torchjd_golden.DynamicK`, the monitor sees the Gramian blocks it computes (cosines
    between groups read 0, except on regrouping calls).

    ``record(gramian, weights=None, *, tasks=None)`` is the contract of every recorder: the
    trainers' ``diagnostics=`` takes this monitor or any object with that method, and the hook
    that :meth:`attach` registers is the one they use. The hook is an object, not a closure:
    an aggregator (or a model holding one) with a monitor attached can be pickled, deep-copied
    and saved whole with ``torch.save``, and the copy records into its own copy of the
    monitor.

    **Task names** come from the ``tasks`` argument of a record (attached, the aggregator's
    ``tasks``, or the training step's task names in the trainers), else :attr:`tasks`, else the
    row indices.

    .. testcode::

        import torch
        from torchjd.autojac import backward, jac_to_grad
        from torchjd_golden import ConflictMonitor, GoldenPendulum

        model = torch.nn.Linear(4, 3)
        aggregator = GoldenPendulum()
        monitor = ConflictMonitor(tasks=["price", "volume", "risk"])
        monitor.attach(aggregator)
        for _ in range(3):
            losses = model(torch.randn(8, 4)).pow(2).mean(dim=0)
            backward(losses)
            jac_to_grad(model.parameters(), aggregator)
        report = monitor.report()  # reads the last step
        print(report.step, sorted(report.gradient_norms), 0.0 <= report.conflict_ratio <= 1.0)

    .. testoutput::

        2 ['price', 'risk', 'volume'] True

    :param window_size: Number of steps kept.
    :param alert_conflict_ratio: Alert above this conflict ratio.
    :param alert_norm_ratio: Alert above this norm ratio.
    :param alert_balance_floor: Alert below this (positive) balance.
    :param tasks: The task names of the coming records (kept until changed), or ``None``.
    :param rounded: Whether reports round their values as the reference does (conflict ratio
        and cosines to 4 decimals, norm ratio to 2, deviation to 6, balance and resonance to 4);
        the summary then averages the rounded values.
    :param target_dtype: The dtype of the golden targets of the deviation (``None``: float64;
        the reference's are float32).
    """

    def __init__(
        self,
        window_size: int = 500,
        alert_conflict_ratio: float = 0.6,
        alert_norm_ratio: float = 100.0,
        alert_balance_floor: float = 0.10,
        *,
        tasks: Sequence[Hashable] | None = None,
        rounded: bool = False,
        target_dtype: torch.dtype | None = None,
    ) -> None:
        self.window_size = check_int("window_size", window_size, low=1)
        self.alert_conflict_ratio = check_real("alert_conflict_ratio", alert_conflict_ratio)
        self.alert_norm_ratio = check_real("alert_norm_ratio", alert_norm_ratio)
        self.alert_balance_floor = check_real("alert_balance_floor", alert_balance_floor)
        self.tasks = tasks
        self.rounded = check_bool("rounded", rounded)
        self.target_dtype = target_dtype if target_dtype is not None else torch.float64
        self.reset()

    @property
    def step_count(self) -> int:
        """The number of steps recorded so far."""
        return self._step_count

    def reset(self) -> None:
        """Forgets every record."""

        self._step_count = 0
        self._statistics: Tensor | None = None  # [window, 5], a ring over the steps
        self._last: tuple[tuple[Hashable, ...], Tensor, Tensor] | None = None  # names, cos, norms
        self._columns: dict[Hashable, int] = {}
        self._weights: Tensor | None = None  # [window, tasks seen], a ring over weight records
        self._weight_names: deque[tuple[Hashable, ...]] = deque(maxlen=self.window_size)
        self._weight_count = 0
        self._last_weights: Tensor | None = None
        self._cache: dict[Any, Tensor] = {}

    def attach(self, aggregator: nn.Module) -> RemovableHandle:
        """
        Records every call of ``aggregator`` (a torchjd ``WeightedAggregator``, ours included, or
        a Gramian weighting) through a :class:`~._recorder.RecordingHook`, the hook every recorder
        shares. Returns the hook's handle: ``handle.remove()`` detaches it.
        """

        return hook_recorder(aggregator, self)

    def record_weights(
        self,
        weights: Tensor | Mapping[Any, float] | Mapping[Any, Tensor],
        *,
        tasks: Iterable[Hashable] | None = None,
    ) -> None:
        """
        Appends task weights to the window: a tensor (named by ``tasks``, :attr:`tasks` or the
        row indices) or a mapping from names to weights. The deviation, balance and resonance of
        later records use them.
        """

        if isinstance(weights, Mapping):
            names = tuple(weights)
            values = [torch.as_tensor(v, dtype=torch.float64) for v in weights.values()]
            device = values[0].device if values else torch.device("cpu")
            vector = torch.stack([v.to(device) for v in values]) if values else torch.zeros(0)
        else:
            vector = weights.detach().to(torch.float64)
            names = self._names(vector.shape[0], tasks)
        if self._weights is not None:
            vector = vector.to(self._weights.device)
        self._ensure_columns(names, vector.device)
        assert self._weights is not None
        slot = self._weight_count % self.window_size
        columns = self._index(("columns", names), [self._columns[n] for n in names], vector.device)
        self._weights[slot] = 0.0  # a task absent from this record weighs 0 in it
        self._weights[slot].index_copy_(0, columns, vector)
        self._weight_names.append(names)
        self._weight_count += 1
        self._last_weights = vector

    def record(
        self,
        gramian: Tensor,
        weights: Tensor | Mapping[Any, float] | Mapping[Any, Tensor] | None = None,
        *,
        tasks: Iterable[Hashable] | None = None,
    ) -> None:
        """
        Records one step from its Gramian :math:`J J^\\top` (and the step's weights, recorded
        first when given). Only tensor operations on the Gramian's device: no host read.
        """

        names = self._names(gramian.shape[0], tasks)
        if weights is not None:
            self.record_weights(weights, tasks=names)
        gramian = gramian.detach().to(torch.float64)
        m = gramian.shape[0]
        cosine, conflicts, norms, norm_ratio = conflict_statistics(gramian, min_norm=_MIN_NORM)
        conflict_ratio = conflicts.sum().to(torch.float64) / max(m * (m - 1) // 2, 1)
        deviation, balance = self._weight_statistics(gramian)
        statistics = torch.stack(
            [conflict_ratio, norm_ratio, deviation, balance, self._resonance(gramian)]
        )
        if self._statistics is None or self._statistics.device != gramian.device:
            self._statistics = gramian.new_zeros((self.window_size, len(STATISTICS)))
        self._statistics[self._step_count % self.window_size] = statistics
        self._last = (names, cosine, norms)
        self._step_count += 1

    def scalars(self) -> dict[str, Tensor]:
        """
        The last step's statistics (``conflict_ratio``, ``norm_ratio``, ``weight_deviation``,
        ``balance_ratio``, ``resonance``) as 0-dim tensors on its device, for a logger: no host
        read (empty before any step).
        """

        if self._statistics is None or self._step_count == 0:
            return {}
        row = self._statistics[(self._step_count - 1) % self.window_size]
        return dict(zip(STATISTICS, row.unbind(), strict=True))

    def _names(self, m: int, tasks: Iterable[Hashable] | None) -> tuple[Hashable, ...]:
        names = check_task_names(tasks) or self._tasks or tuple(range(m))
        if len(names) != m:
            raise ValueError(
                f"`ConflictMonitor` has {len(names)} task names {names!r} for {m} tasks: set "
                "`.tasks` (or pass `tasks=`) with one name per row."
            )
        return names

    def _index(self, key: Any, values: list[int], device: torch.device) -> Tensor:
        """An index tensor on ``device``, created once (a host-to-device copy) and reused."""

        cached = self._cache.get((key, device))
        if cached is None:
            cached = self._cache[(key, device)] = torch.tensor(
                values, dtype=torch.long, device=device
            )
        return cached

    def _ensure_columns(self, names: tuple[Hashable, ...], device: torch.device) -> None:
        new = [name for name in names if name not in self._columns]
        for name in new:
            self._columns[name] = len(self._columns)
        if self._weights is None:
            self._weights = torch.zeros(
                (self.window_size, len(self._columns)), dtype=torch.float64, device=device
            )
        elif new:
            self._weights = torch.cat(
                [self._weights, self._weights.new_zeros(self.window_size, len(new))], 1
            )

    def _weight_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        zero = like.new_zeros(())
        last = self._last_weights
        if last is None or last.numel() == 0:  # the reference's "no weights yet"
            return zero, zero
        last = last.to(like.device)
        key = ("targets", last.shape[0])
        targets = self._cache.get((key, like.device))
        if targets is None:
            golden = golden_ratio_weights(last.shape[0], dtype=self.target_dtype)
            targets = self._cache[(key, like.device)] = golden.to(like.device, torch.float64)
        deviation = (last - targets).square().sum().sqrt()
        largest = last.max()
        balance = torch.where(largest > 0.0, last.min() / largest, zero)
        return deviation, balance

    def _resonance(self, like: Tensor) -> Tensor:
        zero = like.new_zeros(())
        kept = len(self._weight_names)
        if kept < _RESONANCE_MIN_RECORDS or not self._weight_names[0]:
            return zero
        assert self._weights is not None
        column = self._columns[self._weight_names[0][0]]
        length = min(kept, _RESONANCE_SPAN)
        first = self._weight_count - length
        slots = (torch.arange(length, device=self._weights.device) + first) % self.window_size
        series = self._weights[slots, column].to(like.device)
        centered = series - series.mean()
        variance = centered.square().mean()
        lags = [lag for lag in _RESONANCE_LAGS if lag < length // 2]
        products = torch.stack([(centered[lag:] * centered[:-lag]).sum() for lag in lags])
        largest = (products / (length * variance)).abs().max().clamp(min=0.0, max=1.0)
        return torch.where(variance < _MIN_VARIANCE, zero, largest)

    def _statistics_of_last(self, count: int) -> list[dict[str, float]]:
        """The statistics of the last ``count`` records, oldest first (one host read)."""

        if self._statistics is None:
            return []
        count = min(count, self._step_count, self.window_size)
        slots = [(self._step_count - count + i) % self.window_size for i in range(count)]
        rows = self._statistics[slots].tolist()
        return [statistics_of(row, self.rounded) for row in rows]

    def report(self) -> ConflictReport:
        """The report of the last recorded step (reads it on the host)."""

        if self._last is None or self._statistics is None:
            raise ValueError("`ConflictMonitor.report` needs a recorded step: call `record` first.")
        names, cosine, norms = self._last
        (statistics,) = self._statistics_of_last(1)
        return ConflictReport(
            step=self._step_count - 1,
            conflict_ratio=statistics["conflict_ratio"],
            conflict_pairs=conflicting_pairs(names, cosine.tolist(), self.rounded),
            gradient_norms=dict(zip(names, norms.tolist(), strict=True)),
            norm_ratio=statistics["norm_ratio"],
            weight_deviation=statistics["weight_deviation"],
            balance_ratio=statistics["balance_ratio"],
            resonance_score=statistics["resonance"],
        )

    @property
    def alerts(self) -> list[str]:
        """The alerts of the last recorded step, with the reference's wording (reads it)."""

        if self._statistics is None:
            return []
        row = self._statistics[(self._step_count - 1) % self.window_size].tolist()
        return alert_messages(
            dict(zip(STATISTICS, row, strict=True)),
            conflict_ratio=self.alert_conflict_ratio,
            norm_ratio=self.alert_norm_ratio,
            balance_floor=self.alert_balance_floor,
        )

    def summary(self) -> str:
        """The reference's summary: averages over the last 10 steps, and the current alerts."""

        recent = self._statistics_of_last(_SUMMARY_SPAN)
        return summary_text(recent, self.alerts)

    def history(self) -> dict[str, Tensor]:
        """
        The statistics of the steps in the window, oldest first, as tensors on the device
        (``conflict_ratio``, ``norm_ratio``, ``weight_deviation``, ``balance_ratio``,
        ``resonance``): no host read.
        """

        if self._statistics is None:
            return {}
        count = min(self._step_count, self.window_size)
        first = self._step_count - count
        slots = (torch.arange(count, device=self._statistics.device) + first) % self.window_size
        rows = self._statistics[slots]
        return {name: rows[:, k] for k, name in enumerate(STATISTICS)}

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(window_size={self.window_size!r}, "
            f"alert_conflict_ratio={self.alert_conflict_ratio!r}, "
            f"alert_norm_ratio={self.alert_norm_ratio!r}, "
            f"alert_balance_floor={self.alert_balance_floor!r})"
        )
