from __future__ import annotations

import getpass
import os
import tempfile
from collections.abc import Iterator

import pytest
import torch

from torchjd_golden.aggregation._kernels import solver_path as forced_solver_path

# Inductor's on-disk cache does not tell kernels built for one ATEN_CPU_CAPABILITY from another's
# (torch 2.13): a run under another capability would reuse them and compute wrong values. Each
# capability the suite runs under gets its own cache (set before inductor is first imported).
_CAPABILITY = os.environ.get("ATEN_CPU_CAPABILITY")
if _CAPABILITY is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{_CAPABILITY}"
    )


@pytest.fixture(params=["host", "tensor"])
def solver_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """
    Runs a test once with the host kernels that CPU tensors use in eager mode, and once with the
    tensor kernels that accelerators and ``torch.compile`` use.
    """

    with forced_solver_path(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
