from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from torchjd_golden._kernels import solver_path as forced_solver_path


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
