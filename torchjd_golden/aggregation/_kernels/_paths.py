"""
The choice between a kernel's two execution paths.

Every kernel in this package runs a short sequential algorithm on an ``m x m`` matrix. It has two
paths with one signature and one convention:

- ``"host"``: NumPy on the CPU, in float64. Each step is one vectorised operation on an
  ``m``-long row, and the loops skip what they can (pairs that do not conflict), which tensor code
  could only do by reading values back. It is the fast path for CPU tensors in eager mode.
- ``"tensor"``: torch operations on the input's device, with no host-device synchronisation
  (no ``.item()``, no branch on a tensor: masks and ``torch.where``), so a step stays queued on an
  accelerator, traces with ``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph.

``"auto"`` (the default) takes the host path for a CPU tensor outside of ``torch.compile`` and
the tensor path otherwise. A kernel's ``path`` argument, or the :func:`solver_path` context
manager around a call, forces one; while :func:`torch.compile` traces, only the tensor path can
run and is always taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

SolverPath = Literal["auto", "host", "tensor"]
_PATHS = ("auto", "host", "tensor")

_requested: ContextVar[SolverPath] = ContextVar("torchjd_golden_solver_path", default="auto")


def _checked(path: object) -> SolverPath:
    if path not in _PATHS:
        raise ValueError(f"A solver path is one of {', '.join(map(repr, _PATHS))}. Found {path!r}.")
    return path  # type: ignore[return-value]


@contextmanager
def solver_path(path: SolverPath) -> Iterator[None]:
    """
    Runs the kernels called inside the ``with`` block on ``path`` (``"auto"``, ``"host"`` or
    ``"tensor"``), unless a call names its own. The choice is local to the current thread or task.
    """

    token = _requested.set(_checked(path))
    try:
        yield
    finally:
        _requested.reset(token)


def chosen_path(tensor: Tensor, path: SolverPath | None = None) -> Literal["host", "tensor"]:
    """The path a kernel takes for input ``tensor``, given its ``path`` argument."""

    if torch.compiler.is_compiling():
        return "tensor"
    requested = _requested.get() if path is None else _checked(path)
    if requested == "auto":
        return "host" if tensor.device.type == "cpu" else "tensor"
    return requested


def solver_dtype(device: torch.device) -> torch.dtype:
    """
    The dtype of the tensor path's ``m x m`` arithmetic: float64, as on the host path (the
    matrices are tiny, and the tiny cosines left by a projection must not drown in float32
    cancellation), except where the device has no float64 (MPS).
    """

    return torch.float32 if device.type == "mps" else torch.float64


def host_array(tensor: Tensor) -> NDArray[np.float64]:
    """A float64 NumPy copy of ``tensor``, for the host path to work on in place."""

    array: NDArray[np.float64] = tensor.detach().to(device="cpu", dtype=torch.float64).numpy()
    copy: NDArray[np.float64] = array.copy()
    return copy
