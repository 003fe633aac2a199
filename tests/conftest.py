from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from torchjd_golden import _gramian


@pytest.fixture(params=["host", "device"])
def solver_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """
    Runs a test once with the Python-float solvers that CPU tensors use in eager mode, and once
    with the tensor solvers that accelerators and ``torch.compile`` use.
    """

    previous = _gramian.host_solvers_enabled
    _gramian.host_solvers_enabled = request.param == "host"
    yield request.param
    _gramian.host_solvers_enabled = previous


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
