from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close
from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL

from benchmarks._measure import peak_memory_supported
from torchjd_golden import ExcessMTL, ExcessMTLWeighting
from torchjd_golden.aggregation import _excess_mtl
from torchjd_golden.aggregation._kernels import solver_path

from .._asserts import (
    assert_compiled_matches_eager,
    assert_linear_under_scaling,
    assert_nonfinite_step_is_skipped,
    assert_resumes_bit_identically,
    relative_error,
)
from .._methods import Method

OURS = Method("ExcessMTL", ExcessMTL, {"n_warmup_steps": 2}, stateful=True)
THEIRS = Method("torchjd ExcessMTL", TorchJDExcessMTL, {"n_warmup_steps": 2}, stateful=True)


def _sequence(m: int, n: int, length: int, seed: int) -> list[Tensor]:
    """Float32 Jacobians whose row scales span four decades and drift from step to step."""

    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, m).unsqueeze(1) if m > 1 else torch.ones(1, 1)
    return [
        scales * (1.0 + 0.2 * t) * torch.randn(m, n, generator=generator) for t in range(length)
    ]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 64 elements, so that small Jacobians span many chunks."""

    monkeypatch.setattr(_excess_mtl, "_CHUNK_ELEMENTS", 64)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n_warmup_steps", [0, 1, 4])
@pytest.mark.parametrize("robust_step_size", [1.0, 0.3])
def test_matches_torchjd_over_long_sequences(
    m: int, n_warmup_steps: int, robust_step_size: float
) -> None:
    ours = ExcessMTL(robust_step_size, n_warmup_steps)
    theirs = TorchJDExcessMTL(robust_step_size, n_warmup_steps)
    our_weighting = ExcessMTLWeighting(robust_step_size, n_warmup_steps)
    their_weighting = TorchJDExcessMTL(robust_step_size, n_warmup_steps).weighting

    for jacobian in _sequence(m, 300, length=24, seed=m):
        assert relative_error(ours(jacobian), theirs(jacobian)) < 1e-5
        assert_close(our_weighting(jacobian), their_weighting(jacobian), rtol=1e-5, atol=1e-7)
    assert int(our_weighting.step_count) == 24


def test_two_consecutive_steps_by_hand() -> None:
    """
    J1 = [[2, 0], [1, 0]]: S = J1^2, E = [4/2, 1/1] = [2, 1] is the baseline, used raw:
    weights = softmax(log(1/2) + [2, 1]) = [e^2, e] / (e^2 + e).
    J2 = [[1, 0], [2, 0]]: S = [[5, 0], [5, 0]], E = [1, 4] / sqrt(5), scaled by 1 / [2, 1].
    """

    weighting = ExcessMTLWeighting()
    first = weighting(torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    e = torch.exp(torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert_close(first, e / e.sum(), rtol=1e-6, atol=0.0)

    second = weighting(torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64))
    scaled = torch.tensor([1.0 / 2.0, 4.0], dtype=torch.float64) / 5.0**0.5
    unnormalized = first * torch.exp(scaled)
    assert_close(second, unnormalized / unnormalized.sum(), rtol=1e-6, atol=0.0)


def test_warmup_is_uniform_and_its_average_is_the_baseline() -> None:
    jacobians = [
        torch.tensor(j, dtype=torch.float64)
        for j in ([[2.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [2.0, 0.0]], [[2.0, 0.0], [1.0, 0.0]])
    ]
    weighting = ExcessMTLWeighting(n_warmup_steps=2)
    for jacobian in jacobians[:2]:
        assert_close(weighting(jacobian), torch.full((2,), 0.5, dtype=torch.float64))

    squares = torch.zeros(2, 2, dtype=torch.float64)
    risks = []
    for jacobian in jacobians:
        squares = squares + jacobian**2
        risks.append((jacobian**2 / torch.sqrt(squares + 1e-7)).sum(dim=1))
    baseline = (risks[0] + risks[1]) / 2.0
    expected = 0.5 * torch.exp(risks[2] / (baseline + 1e-7))
    assert_close(weighting(jacobians[2]), expected / expected.sum())
    assert_close(weighting.baseline, baseline)


def test_weights_lie_on_the_simplex() -> None:
    weighting = ExcessMTLWeighting()
    for jacobian in _sequence(4, 50, length=10, seed=1):
        weights = weighting(jacobian)
        assert (weights >= 0.0).all()
        assert_close(weights.sum(), torch.tensor(1.0))


def test_half_precision_state_is_float32() -> None:
    jacobian = (300.0 * torch.randn(3, 1000)).half()  # squares overflow float16
    aggregator = ExcessMTL()
    output = aggregator(jacobian)
    assert output.dtype == torch.float16
    assert aggregator.weighting.sq_grad_sum.dtype == torch.float32
    assert aggregator.weighting.sq_grad_sum.isfinite().all()
    assert_close(aggregator.weighting.sq_grad_sum, jacobian.float() ** 2)


def test_a_change_of_parameter_count_resets_with_a_warning() -> None:
    weighting = ExcessMTLWeighting()
    for jacobian in _sequence(3, 20, length=3, seed=2):
        weighting(jacobian)
    new_input = torch.randn(3, 30)
    with pytest.warns(UserWarning, match="received 3 tasks and 30 parameters after 3 tasks and 20"):
        output = weighting(new_input)
    assert torch.equal(output, ExcessMTLWeighting()(new_input))


# What torchjd's class does not do: each property is checked on ours and shown to fail on theirs.


def test_checkpoint_resumes_bit_identically() -> None:
    inputs = _sequence(4, 40, length=8, seed=3)
    assert_resumes_bit_identically(OURS, inputs, split=3)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        assert_resumes_bit_identically(THEIRS, inputs, split=3)


def test_state_dict_carries_the_step_count() -> None:
    aggregator = ExcessMTL(n_warmup_steps=5)
    for jacobian in _sequence(2, 10, length=3, seed=4):
        aggregator(jacobian)
    assert int(aggregator.state_dict()["weighting.step_count"]) == 3


@pytest.mark.parametrize("poisoned_index", [0, 1, 5])
def test_a_non_finite_step_leaves_the_state_untouched(poisoned_index: int) -> None:
    inputs = _sequence(4, 40, length=8, seed=5)
    assert_nonfinite_step_is_skipped(OURS, inputs, poisoned_index)
    with pytest.raises(AssertionError):
        assert_nonfinite_step_is_skipped(THEIRS, inputs, poisoned_index)


def test_no_recompilation_or_graph_break_over_a_long_run() -> None:
    """More steps than Dynamo's recompile limit: a Python-side step counter would hit it."""

    inputs = [x.double() for x in _sequence(3, 16, length=12, seed=6)]
    assert len(inputs) > torch._dynamo.config.recompile_limit
    assert_compiled_matches_eager(OURS, inputs, tol=1e-12)
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        assert_compiled_matches_eager(THEIRS, inputs, tol=1e-12)


_MEMORY_PROBE = """
import json, torch
from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL
from benchmarks._measure import extra_peak_bytes
from torchjd_golden import ExcessMTL

jacobian = torch.randn(8, 2_000_000)  # 64 MB: above glibc's largest mmap threshold
size = jacobian.numel() * jacobian.element_size()
ours, theirs = ExcessMTL(), TorchJDExcessMTL()
for warm_up in (ExcessMTL(), TorchJDExcessMTL()):  # loads the code pages of the ops first
    warm_up(torch.randn(8, 1000))
ratios = {"ours_first": extra_peak_bytes(lambda: ours(jacobian)) / size,
          "ours_later": extra_peak_bytes(lambda: ours(jacobian)) / size}
theirs(jacobian)
ratios["theirs_later"] = extra_peak_bytes(lambda: theirs(jacobian)) / size
print(json.dumps(ratios))
"""


@pytest.mark.skipif(not peak_memory_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_a_call_adds_no_jacobian_sized_temporaries() -> None:
    """
    Measured in a fresh process: the first call allocates the m x n state plus chunk-sized
    blocks, at most 1.3 x J in all; a later call at most 0.3 x J. torchjd's later calls add
    three Jacobian-sized temporaries.
    """

    root = Path(__file__).resolve().parents[2]
    probe = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE], cwd=root, capture_output=True, text=True, check=True
    )
    ratios = json.loads(probe.stdout.strip().splitlines()[-1])
    assert ratios["ours_first"] <= 1.3
    assert ratios["ours_later"] <= 0.3
    assert ratios["theirs_later"] > 2.0


def test_same_representation_as_torchjd() -> None:
    assert repr(ExcessMTL()) == repr(TorchJDExcessMTL())
    assert repr(ExcessMTL(0.5, 3)) == repr(TorchJDExcessMTL(0.5, 3))


def test_not_linear_under_scaling() -> None:
    """
    The documented exception: the excess risks are exponentiated. (With very unequal rows the
    weights saturate to one task, and the aggregation is then linear: small rows show it.)
    """

    jacobian = 0.1 * torch.randn(3, 3, generator=torch.Generator().manual_seed(7))

    class FreshExcessMTL(torch.nn.Module):
        def forward(self, matrix: Tensor) -> Tensor:
            return ExcessMTL()(matrix)

    with pytest.raises(AssertionError):
        assert_linear_under_scaling(FreshExcessMTL(), jacobian, tol=1e-3)


def test_a_change_of_precision_resets_as_torchjd_does() -> None:
    """torchjd's ExcessMTL restarts on a change of dtype: so does ours (with a warning)."""

    jacobian = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    ours, theirs = ExcessMTL(), TorchJDExcessMTL()
    for step, matrix in enumerate([jacobian, 2 * jacobian, (3 * jacobian).double(), 4 * jacobian]):
        if step in (2, 3):
            with pytest.warns(UserWarning, match=r"torch\.float.* input .*state was reset"):
                output = ours(matrix)
        else:
            output = ours(matrix)
        assert_close(output, theirs(matrix), rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("small_chunks")
def test_the_host_path_reads_the_finite_flag_and_equals_the_tensor_path() -> None:
    """
    On the host path a finite step is known before S is touched, so the chunks of J are read in
    place: the caller's J is never written (rows that need scaling included) and the weights and
    S are the tensor path's, bit for bit, through a non-finite step and a subset of named tasks.
    """

    jacobians = _sequence(4, 300, length=6, seed=8)
    jacobians[2] = jacobians[2].clone()
    jacobians[2][1, 7] = torch.nan
    jacobians[4] = jacobians[4].clone()
    jacobians[4][3] *= 1e30  # squares beyond float32: a scaled row
    names = [("a", "b", "c", "d")] * 5 + [("d", "b")]
    jacobians[5] = jacobians[5][:2]
    results = {}
    for path in ("host", "tensor"):
        weighting, outputs = ExcessMTLWeighting(n_warmup_steps=1), []
        with solver_path(path):
            for jacobian, tasks in zip(jacobians, names, strict=True):
                weighting.tasks = tasks
                before = jacobian.clone()
                outputs.append(weighting(jacobian))
                assert torch.equal(jacobian.nan_to_num(), before.nan_to_num())
        results[path] = (outputs, weighting.sq_grad_sum.clone())
    (host, host_sum), (tensor, tensor_sum) = results["host"], results["tensor"]
    for a, b in zip(host, tensor, strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
        assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(host_sum, tensor_sum)
    assert host[2].isnan().all()
    assert host[4].isfinite().all()


def _every_magnitude() -> Tensor:
    """
    Float64 values of every binary exponent, subnormals included: the powers of two, their
    neighbours on both sides, a spread of mantissas, their negatives, and 0, -0, ±inf, NaN.
    """

    exponents = torch.arange(-1074, 1024, dtype=torch.float64)
    powers = torch.ldexp(torch.ones_like(exponents), exponents)
    inf = torch.full_like(powers, torch.inf)
    mantissas = torch.linspace(1.0, 2.0, 9, dtype=torch.float64)[:-1]
    spread = (powers.unsqueeze(1) * mantissas).flatten()
    special = [0.0, torch.finfo(torch.float64).max, torch.finfo(torch.float64).tiny]
    values = torch.cat(
        [
            powers,
            torch.nextafter(powers, inf),
            torch.nextafter(powers, -inf),
            spread[spread.isfinite()],
            torch.tensor([*special, torch.inf, torch.nan], dtype=torch.float64),
        ]
    )
    return torch.cat([values, -values])


def test_binary_exponents_are_those_of_frexp() -> None:
    """Inductor cannot compile frexp: the exponents read from the bits are its, compiled too."""

    values = _every_magnitude()
    assert (values.abs() < torch.finfo(torch.float64).tiny).sum() > 1000  # subnormals
    expected = torch.frexp(values).exponent.to(torch.int64)
    assert torch.equal(_excess_mtl.binary_exponents(values), expected)
    torch._dynamo.reset()
    compiled = torch.compile(_excess_mtl.binary_exponents, fullgraph=True)
    assert torch.equal(compiled(values), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_overflow_free_scales_are_those_of_frexp(dtype: torch.dtype) -> None:
    """
    Inductor cannot compile frexp: the scales are the same powers of two as the formula on
    frexp's exponents, bit for bit, over every binary exponent, eager and compiled by inductor.
    """

    largest = _every_magnitude()
    headroom = (math.floor(math.log2(torch.finfo(dtype).max)) - 40) // 2
    exponents = torch.frexp(largest).exponent.to(torch.float64)
    needed = torch.exp2((exponents - headroom).clamp(min=0.0)).to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(_excess_mtl.overflow_free_scales, fullgraph=True)
    for previous in (torch.ones_like(needed), torch.full_like(needed, 2.0**60)):
        expected = torch.maximum(previous, needed)
        assert torch.equal(_excess_mtl.overflow_free_scales(largest, previous, dtype), expected)
        assert torch.equal(compiled(largest, previous, dtype), expected)
