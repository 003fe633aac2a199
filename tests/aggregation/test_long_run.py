"""
A shorter version of ``python -m benchmarks.long_run``: repeated calls of each stateful aggregator
stay finite, retain no autograd graph, and neither the state nor the number of live tensors grows.
"""

from __future__ import annotations

import pytest

from benchmarks.long_run import STATEFUL, long_run


@pytest.mark.parametrize("name", STATEFUL)
def test_many_calls_stay_finite_and_flat(name: str) -> None:
    run = long_run(name, calls=400, m=6, n=300)
    assert run.all_finite
    assert not run.graph_retained
    first_state, last_state = run.state_bytes
    assert first_state == last_state > 0
    first_tensors, last_tensors = run.live_tensors
    assert last_tensors <= first_tensors
