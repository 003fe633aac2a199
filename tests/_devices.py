"""The devices the tests run on: the CPU always, a CUDA device where one is present."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device, and none is present"
)
"""Marks a test that only a CUDA device can run: skipped (and listed as such) elsewhere."""

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
"""The devices a test runs on, for ``pytest.mark.parametrize("device", DEVICES)``."""


@contextmanager
def host_synchronisation_is_an_error() -> Iterator[None]:
    """
    Inside, any device-to-host synchronisation on CUDA raises (``set_sync_debug_mode("error")``);
    the work queued before is waited for first, so that it cannot be blamed.
    """

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
