"""Monitoring: conflict diagnostics of a Gramian, and a logger of the weights of any weighting."""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator

from ..aggregation._gramian import compute_gramian, nan_unless, normalize_gramian, row_norms
from ..aggregation._tasks import default_task_names
from ..aggregation._torchjd_compat import GramianWeightingBase

# The reference's report clamps the smallest norm here before dividing by it.
_MIN_NORM_FOR_RATIO = 1e-10

_TENSORBOARD_HINT = "pip install 'torchjd-golden[tensorboard]'"


@dataclass(frozen=True)
class GramianDiagnostics:
    """
    Conflict diagnostics of one Gramian, as tensors on its device: nothing is read on the host
    until the caller asks (:meth:`conflicting_pairs`, :meth:`as_dict`).

    :ivar cosine: The cosines :math:`G_{ij} / (\\|J_i\\| \\|J_j\\|)`, zero for a zero row.
    :ivar conflicts: Boolean mask of the pairs :math:`i < j` with a negative cosine.
    :ivar conflict_ratio: The fraction of the :math:`m(m-1)/2` pairs that conflict.
    :ivar norms: The gradient norms :math:`\\|J_k\\|`.
    :ivar norm_ratio: :math:`\\max_k \\|J_k\\| / \\max(\\min_k \\|J_k\\|, 10^{-10})`.
    :ivar balance_ratio: :math:`\\min_k w_k / \\max_k w_k` of the given weights, or ``None``.
    """

    cosine: Tensor
    conflicts: Tensor
    conflict_ratio: Tensor
    norms: Tensor
    norm_ratio: Tensor
    balance_ratio: Tensor | None

    def conflicting_pairs(
        self, tasks: Sequence[Hashable] | None = None
    ) -> list[tuple[Any, Any, float]]:
        """
        The conflicting pairs ``(i, j, cosine)``, ``i < j``, as indices or, given ``tasks``, as
        task names (reads the values on the host).
        """

        names = _task_names(tasks, self.norms.shape[0])
        indices = self.conflicts.nonzero().tolist()
        pairs = [(i, j, float(self.cosine[i, j])) for i, j in indices]
        return pairs if tasks is None else [(names[i], names[j], c) for i, j, c in pairs]

    def as_dict(self, tasks: Sequence[Hashable] | None = None) -> dict[str, Any]:
        """
        The report as Python numbers and lists, ready for JSON (reads them on the host). Given
        ``tasks``, the gradient norms are a mapping by task name and the pairs name their tasks,
        as in the reference's ``ConflictReport``.
        """

        norms = self.norms.tolist()
        report: dict[str, Any] = {
            "conflict_ratio": float(self.conflict_ratio),
            "conflicting_pairs": self.conflicting_pairs(tasks),
            "gradient_norms": norms if tasks is None else dict(zip(tasks, norms, strict=True)),
            "norm_ratio": float(self.norm_ratio),
        }
        if self.balance_ratio is not None:
            report["balance_ratio"] = float(self.balance_ratio)
        return report


def gramian_diagnostics(gramian: Tensor, weights: Tensor | None = None) -> GramianDiagnostics:
    r"""
    The conflict report of ``golden_pendulum.pro.DiagnosticsEngine`` computed from the Gramian
    :math:`G = J J^\top`: cosine matrix, conflict ratio and conflicting pairs, gradient norms and
    their max/min ratio, and, given task weights, their min/max balance ratio (for Golden
    Pendulum, pass its QP solution ``alpha``).

    Everything stays on the Gramian's device and no value is read on the host, so it can run at
    every step without stalling an accelerator.

    **Checks.** The shapes are always checked (they cost nothing): a ``gramian`` that is not a
    square floating-point matrix (a Jacobian, say) and ``weights`` that are not a vector of
    :math:`m` entries raise a ``ValueError`` naming them. The values of a square matrix that is
    not a Gramian (not symmetric, :math:`\max_{ij} |G_{ij} - G_{ji}| > \sqrt{\epsilon}
    \max_k G_{kk}` with :math:`\epsilon` the dtype's machine epsilon, or a negative diagonal)
    can only be judged by reading them: on the CPU, where that read is free, they raise a
    ``ValueError``; on an accelerator, where it would stall the device, the report instead comes
    out NaN everywhere, so it is never silently wrong. A non-finite Gramian (an overflow step)
    gives a non-finite report without raising.

    >>> import torch
    >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    >>> report = gramian_diagnostics(jacobian @ jacobian.T)
    >>> report.conflicting_pairs(), round(float(report.conflict_ratio), 4)
    ([(0, 1, -0.7071067690849304)], 0.3333)
    >>> gramian_diagnostics(jacobian)
    Traceback (most recent call last):
    ...
    ValueError: Parameter `gramian` must be a square m x m matrix ... Found shape (3, 2).
    """

    _check_gramian_shape(gramian)
    m = gramian.shape[0]
    if weights is not None:
        _check_weights(weights, m)
    is_gramian = _is_gramian(gramian)
    cosine, conflicts, norms, norm_ratio = conflict_statistics(gramian)
    balance = None if weights is None else weights.min() / weights.max()
    report = GramianDiagnostics(
        cosine=cosine,
        conflicts=conflicts,
        conflict_ratio=conflicts.sum() / max(m * (m - 1) // 2, 1),
        norms=norms,
        norm_ratio=norm_ratio,
        balance_ratio=balance,
    )
    return report if is_gramian is None else _nan_unless(is_gramian, report)


def _check_gramian_shape(gramian: object) -> None:
    if not isinstance(gramian, Tensor):
        raise TypeError(f"Parameter `gramian` must be a tensor. Found {type(gramian).__name__}.")
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(
            "Parameter `gramian` must be a square m x m matrix (the Gramian J @ J.T of the "
            f"Jacobian). Found shape {tuple(gramian.shape)}."
        )
    if not gramian.is_floating_point():
        raise ValueError(f"Parameter `gramian` must be floating-point. Found {gramian.dtype}.")


def _check_weights(weights: object, m: int) -> None:
    if not isinstance(weights, Tensor):
        raise TypeError(f"Parameter `weights` must be a tensor. Found {type(weights).__name__}.")
    if weights.shape != (m,):
        raise ValueError(
            f"Parameter `weights` must hold one weight per task: shape ({m},) for this "
            f"{m} x {m} Gramian. Found shape {tuple(weights.shape)}."
        )


def conflict_statistics(
    gramian: Tensor, min_norm: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """
    The cosine matrix (rows shorter than ``min_norm`` divided by it), the boolean upper triangle
    of the conflicting pairs :math:`i < j`, the row norms and :math:`\\max_k \\|J_k\\| /
    \\max(\\min_k \\|J_k\\|, 10^{-10})` of ``gramian``: tensor operations only.
    """

    cosine, _ = normalize_gramian(gramian, min_norm=min_norm)
    norms = row_norms(gramian)
    norm_ratio = norms.max() / norms.min().clamp(min=_MIN_NORM_FOR_RATIO)
    return cosine, (cosine < 0.0).triu(diagonal=1), norms, norm_ratio


def hook_gramian(inputs: tuple[Tensor, ...], gramian_input: bool) -> Tensor:
    """
    The Gramian of a weighting's call, from the input its forward hook sees: that input when the
    weighting takes the Gramian, computed from the Jacobian (an :math:`O(m^2 n)` product)
    otherwise.
    """

    stat = inputs[0].detach()
    return stat if gramian_input else compute_gramian(stat)


def hook_alpha(module: nn.Module, weights: Tensor) -> Tensor | None:
    """
    The ``alpha`` a weighting kept for the call that gave ``weights`` (Golden Pendulum's QP
    solution, what its references report as the weights), or ``None``.
    """

    alpha = getattr(module, "alpha", None)
    return alpha if isinstance(alpha, Tensor) and alpha.shape == weights.shape else None


def _is_gramian(gramian: Tensor) -> Tensor | None:
    """
    On the CPU, raises unless ``gramian`` is symmetric with a non-negative diagonal, and returns
    ``None``; elsewhere returns that condition as a boolean tensor, without reading it.
    """

    if gramian.device.type == "meta":
        return None
    diagonal = gramian.diagonal()
    tolerance = math.sqrt(torch.finfo(gramian.dtype).eps) * diagonal.max().clamp(min=0.0)
    # NaN compares false, so a non-finite Gramian passes and gives a non-finite report.
    asymmetric = ((gramian - gramian.T).abs() > tolerance).any()
    negative = (diagonal < 0.0).any()
    if gramian.device.type != "cpu" or torch.compiler.is_compiling():
        return ~(asymmetric | negative)
    if asymmetric:
        raise ValueError(
            "Parameter `gramian` is not symmetric, so it is not a Gramian J @ J.T (its largest "
            f"asymmetry is {float((gramian - gramian.T).abs().max()):.3g})."
        )
    if negative:
        raise ValueError(
            "Parameter `gramian` has a negative diagonal entry, so it is not a Gramian J @ J.T "
            f"(its diagonal is {diagonal.tolist()})."
        )
    return None


def _nan_unless(condition: Tensor, report: GramianDiagnostics) -> GramianDiagnostics:
    balance = report.balance_ratio
    return GramianDiagnostics(
        cosine=nan_unless(condition, report.cosine),
        conflicts=report.conflicts & condition,
        conflict_ratio=nan_unless(condition, report.conflict_ratio),
        norms=nan_unless(condition, report.norms),
        norm_ratio=nan_unless(condition, report.norm_ratio),
        balance_ratio=None if balance is None else nan_unless(condition, balance),
    )


def _task_names(tasks: Sequence[Hashable] | None, m: int) -> list[Any]:
    """``tasks`` (checked to have ``m`` entries), or ``task_0`` ... ``task_{m-1}``."""

    if tasks is None:
        return list(default_task_names(m))
    names = list(tasks)
    if len(names) != m:
        raise ValueError(f"Parameter `tasks` names {len(names)} tasks, but there are {m} weights.")
    return names


def text_task_names(tasks: Sequence[Hashable] | None, m: int) -> list[str]:
    """
    The task names as text, the keys of a log (``tasks``, checked to have ``m`` entries, or
    ``task_0`` ... ``task_{m-1}``).

    :raises ValueError: If two names read the same as text (``1`` and ``"1"``): their logged
        values would overwrite each other.
    """

    texts: dict[str, Hashable] = {}
    for name in _task_names(tasks, m):
        text = str(name)
        if text in texts:
            raise ValueError(
                f"The task names {texts[text]!r} and {name!r} both read {text!r} as text, so "
                "their logged weights would overwrite each other: give names that differ as text."
            )
        texts[text] = name
    return list(texts)


def weight_scalars(
    weights: Tensor, tasks: Sequence[Hashable], alpha: Tensor | None = None
) -> dict[str, Tensor]:
    r"""
    The scalars to log for one call of a weighting, as 0-dimensional tensors (nothing is read on
    the host): ``weight/{task}`` and ``balance_ratio`` (:math:`\min_k w_k / \max_k w_k`), and,
    given Golden Pendulum's QP solution :math:`\alpha` (the numbers golden-pendulum-mtl reports
    as its weights), ``alpha/{task}`` and ``alpha_balance_ratio``.
    """

    values = weights.detach().float()
    names = text_task_names(tasks, values.shape[0])
    scalars = {f"weight/{name}": value for name, value in zip(names, values.unbind(), strict=True)}
    scalars["balance_ratio"] = values.min() / values.max()
    if alpha is not None:
        alphas = alpha.detach().float()
        scalars |= {f"alpha/{name}": a for name, a in zip(names, alphas.unbind(), strict=True)}
        scalars["alpha_balance_ratio"] = alphas.min() / alphas.max()
    return scalars


def weighting_of(aggregator: nn.Module) -> nn.Module:
    """
    The weighting to hook for ``aggregator``'s weights: its Gramian weighting if it has one
    (that is where Golden Pendulum keeps ``alpha``), else its weighting.
    """

    if isinstance(aggregator, GramianWeightedAggregator):
        return aggregator.gramian_weighting
    if isinstance(aggregator, WeightedAggregator):
        return aggregator.weighting
    raise TypeError(
        f"`{aggregator.__class__.__name__}` does not combine the rows with a weighting, so it has "
        "no weights to log or record."
    )


class WeightLogger:
    """
    A forward hook for any torchjd weighting (ours or torchjd's) that logs the weights it
    returns, by task name: as JSON lines in a file, and as TensorBoard scalars.

    .. code-block:: python

        logger = WeightLogger("weights.jsonl", tasks=["depth", "segmentation", "normals"],
                              tensorboard_dir="runs/mtl", every=10)
        logger.attach(aggregator)  # or aggregator.gramian_weighting.register_forward_hook(logger)

    Every ``every``-th call writes one line ``{"step", "method", "weights", "balance_ratio"}``,
    with the weights as a mapping by task name. The names are ``tasks``, else the hooked
    weighting's own ``tasks`` when it has them, else ``task_0``, ``task_1``, ... For Golden
    Pendulum, the line also holds ``alpha`` and ``alpha_balance_ratio``: the QP solution, which
    is what golden-pendulum-mtl reports as its weights and balance (the weights on the rows of
    the Jacobian also hold the inverse gradient norms, so their balance is much lower). With
    ``diagnostics=True`` it adds the :func:`gramian_diagnostics` report of the weighting's input
    (taken as a Gramian for a Gramian weighting, as a Jacobian otherwise). The TensorBoard
    scalars are ``{tag}/weight_{task}``, ``{tag}/balance_ratio`` and, where they apply,
    ``{tag}/alpha_{task}``, ``{tag}/alpha_balance_ratio``, ``{tag}/conflict_ratio`` and
    ``{tag}/norm_ratio``.

    The lines are strict JSON: a non-finite value (an overflow step) is written ``null``, not
    the bare ``NaN`` of :func:`json.dumps`. Logging reads the values on the host, so it
    synchronises with an accelerator on the logged steps only. Call :meth:`close` (or use it as
    a context manager) to flush the files: a closed logger refuses to log (remove its hook
    first). The task names must differ as text (``1`` and ``"1"`` would share a key): names
    that do not raise ``ValueError``.

    A copy (``copy.deepcopy``, pickling or ``torch.save`` of a module this logger hooks) is a
    logger with the same settings and step count that writes to the same file and TensorBoard
    directory (a ``writer`` given by the caller is shared by a deep copy, not copied).

    :param path: The JSON-lines file, or ``None`` for none.
    :param tasks: The names of the tasks, one per weight.
    :param tensorboard_dir: A directory for a new ``torch.utils.tensorboard.SummaryWriter``
        (needs ``pip install 'torchjd-golden[tensorboard]'``).
    :param writer: An existing ``SummaryWriter`` (or anything with ``add_scalar``) to use instead.
    :param every: Log one call out of ``every``.
    :param diagnostics: Also log the conflict diagnostics of the weighting's input.
    :param tag: The prefix of the TensorBoard scalars.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        tasks: Sequence[Hashable] | None = None,
        tensorboard_dir: str | Path | None = None,
        writer: Any = None,
        every: int = 1,
        diagnostics: bool = False,
        tag: str = "weights",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"Parameter `every` must be a positive integer. Found every={every!r}."
            )
        if writer is not None and tensorboard_dir is not None:
            raise ValueError("Give either `writer` or `tensorboard_dir`, not both.")
        if tasks is not None and (isinstance(tasks, str) or len(set(tasks)) != len(tasks)):
            raise ValueError(f"Parameter `tasks` must be a sequence of distinct names: {tasks!r}.")
        if tasks is not None:
            text_task_names(tasks, len(tasks))
        self.path = None if path is None else Path(path)
        self.tasks = None if tasks is None else tuple(tasks)
        self.tensorboard_dir = None if tensorboard_dir is None else Path(tensorboard_dir)
        self._owns_writer = tensorboard_dir is not None
        self.writer = _summary_writer(self.tensorboard_dir) if self._owns_writer else writer
        self.every, self.diagnostics, self.tag = every, diagnostics, tag
        self._file: TextIO | None = None
        self._closed = False
        self.step = 0

    def attach(self, aggregator: Aggregator) -> RemovableHandle:
        """Registers this logger on the weighting of ``aggregator`` that gives its weights."""

        return weighting_of(aggregator).register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], weights: Tensor) -> None:
        if self._closed:
            raise ValueError(
                "This WeightLogger is closed, but a weighting it is hooked on was called: remove "
                "the hook first (`handle.remove()` with the handle `attach` returned), or attach a "
                "new logger."
            )
        step, self.step = self.step, self.step + 1
        if step % self.every:
            return
        tasks = self.tasks if self.tasks is not None else getattr(module, "tasks", None)
        names = text_task_names(tasks, weights.shape[0])
        alpha = hook_alpha(module, weights)
        tensors = weight_scalars(weights, names, alpha)
        values = torch.stack(list(tensors.values())).tolist()  # one host read for the step
        scalars = dict(zip(tensors, values, strict=True))
        record: dict[str, Any] = {
            "step": step,
            "method": str(module),
            "weights": {name: scalars[f"weight/{name}"] for name in names},
            "balance_ratio": scalars["balance_ratio"],
        }
        if alpha is not None:
            record["alpha"] = {name: scalars[f"alpha/{name}"] for name in names}
            record["alpha_balance_ratio"] = scalars["alpha_balance_ratio"]
        if self.diagnostics:
            record |= gramian_diagnostics(
                hook_gramian(inputs, isinstance(module, GramianWeightingBase))
            ).as_dict(names)
        self._write(record, scalars, step)

    def _write(self, record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        if self.path is not None:
            if self._file is None:
                self._file = self.path.open("a")
            self._file.write(json.dumps(_strict(record), allow_nan=False) + "\n")
            self._file.flush()
        if self._owns_writer and self.writer is None:
            self.writer = _summary_writer(self.tensorboard_dir)
        if self.writer is not None:
            for key, value in scalars.items():
                name = key.replace("/", "_", 1)  # weight/a -> weight_a
                self.writer.add_scalar(f"{self.tag}/{name}", value, step)
            for key in ("conflict_ratio", "norm_ratio"):
                if key in record:
                    self.writer.add_scalar(f"{self.tag}/{key}", record[key], step)

    def close(self) -> None:
        """
        Closes the JSON-lines file and the writer this logger created. A closed logger refuses
        to log: a later call of a weighting it is still hooked on raises ``ValueError``.
        """

        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None and self._owns_writer:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> WeightLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Open files and the writer's threads cannot be copied: a copy opens its own, lazily.
        state = self.__dict__.copy()
        state["_file"] = None
        if self._owns_writer:
            state["writer"] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightLogger:
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__getstate__())  # shares a caller's writer
        return copy


def _summary_writer(directory: Path | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional dependency
    except ImportError as error:
        raise ImportError(
            f"Writing TensorBoard logs needs the tensorboard package: {_TENSORBOARD_HINT}."
        ) from error
    return SummaryWriter(log_dir=str(directory))


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (``null`` in JSON)."""

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value
