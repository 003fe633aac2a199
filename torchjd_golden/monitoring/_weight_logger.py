"""A logger of the weights of any weighting, by task name: JSON lines and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchjd.aggregation import Aggregator

from ..aggregation._torchjd_compat import GramianWeightingBase
from ._gramian_diagnostics import gramian_diagnostics
from ._weighting_calls import (
    hook_alpha,
    hook_gramian,
    text_task_names,
    weight_scalars,
    weighting_of,
)

_TENSORBOARD_HINT = "pip install 'torchjd-golden[tensorboard]'"


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
