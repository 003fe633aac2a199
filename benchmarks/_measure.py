"""Time and peak-memory measurements shared by the benchmarks (and the memory tests)."""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def median_seconds(function: Callable[[], object], repeat: int = 7, warmup: int = 2) -> float:
    """The median wall time of ``function`` over ``repeat`` calls, after ``warmup`` calls."""

    for _ in range(warmup):
        function()
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} is not in {_STATUS}")
    return 1024 * int(match.group(1))


def peak_memory_supported() -> bool:
    """Whether this process can reset and read its resident-set high-water mark (Linux)."""

    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


def resident_bytes() -> int:
    """The resident memory of this process now (Linux)."""

    return _status_bytes("VmRSS")


def extra_peak_bytes(function: Callable[[], object]) -> int:
    """
    How far the resident memory of this process rises above its level before ``function`` runs:
    the peak of everything it allocates and keeps (state) or frees (temporaries).
    """

    gc.collect()
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
    before = _status_bytes("VmRSS")
    function()
    return _status_bytes("VmHWM") - before
