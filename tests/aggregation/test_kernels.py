"""
The kernels (``torchjd_golden/aggregation/_kernels``): each one's host and tensor paths agree on
every kind of input, the way PyTorch's ``test_foreach_matches_forloop`` checks its two paths; each
matches its reference; the path is chosen by argument or context manager.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from golden_pendulum.core import _pcgrad_resolve, _solve_golden_qp
from torch import Tensor
from torch.testing import assert_close

from torchjd_golden import golden_ratio_weights
from torchjd_golden.aggregation._gramian import compute_gramian, normalize_gramian
from torchjd_golden.aggregation._kernels import chosen_path, solver_path
from torchjd_golden.aggregation._kernels.gcond import ResolveSettings, resolve_conflicts
from torchjd_golden.aggregation._kernels.golden_qp import solve_golden_qp
from torchjd_golden.aggregation._kernels.pcgrad import pcgrad_coefficients, pcgrad_combination

from .._asserts import relative_error
from .._inputs import conflicting_jacobian


def _with_zero_row(matrix: Tensor) -> Tensor:
    matrix = matrix.clone()
    matrix[1] = 0.0
    return matrix


def _with_duplicates(matrix: Tensor) -> Tensor:
    matrix = matrix.clone()
    matrix[2] = matrix[0]
    matrix[-1] = matrix[1]
    return matrix


def _with_anti_parallel_rows(matrix: Tensor) -> Tensor:
    matrix = matrix.clone()
    matrix[2] = -3.0 * matrix[0]
    matrix[-1] = -0.5 * matrix[1]
    return matrix


# The kinds of Jacobians every kernel meets: m x 40, float64.
JACOBIANS: dict[str, Callable[[int, int], Tensor]] = {
    "random": lambda m, seed: conflicting_jacobian(m, 40, seed=seed, decades=3.0),
    "zero row": lambda m, seed: _with_zero_row(conflicting_jacobian(m, 40, seed=seed)),
    "duplicate rows": lambda m, seed: _with_duplicates(conflicting_jacobian(m, 40, seed=seed)),
    "anti-parallel rows": lambda m, seed: _with_anti_parallel_rows(
        conflicting_jacobian(m, 40, seed=seed)
    ),
    "scaled 1e12": lambda m, seed: 1e12 * conflicting_jacobian(m, 40, seed=seed, decades=1.0),
    "scaled 1e-12": lambda m, seed: 1e-12 * conflicting_jacobian(m, 40, seed=seed, decades=1.0),
}
SIZES = [4, 7, 16]


def _both_paths(kernel: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    with solver_path("host"):
        host = kernel()
    with solver_path("tensor"):
        tensor = kernel()
    return host, tensor


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("kind", JACOBIANS)
@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "raw"])
def test_pcgrad_paths_agree(kind: str, m: int, normalized: bool) -> None:
    rows = JACOBIANS[kind](m, m)
    if normalized:
        rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-8)
    gramian = compute_gramian(rows)
    priority = torch.rand(m, dtype=torch.float64)
    priority[m // 2] = priority[0]  # a tie
    host, tensor = _both_paths(lambda: pcgrad_coefficients(gramian, priority))
    assert host.dtype == tensor.dtype == gramian.dtype
    # The resolved rows C J agree. C itself is unique only where J has full rank: with
    # anti-parallel rows, a row projected off its twin is rounding noise, and C is then defined up
    # to J's null space (the two paths round differently, and the steps off that noise are
    # noise / eps).
    assert relative_error(host @ rows, tensor @ rows) < 1e-10
    if kind != "anti-parallel rows":
        assert relative_error(host, tensor) < 1e-10


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("kind", JACOBIANS)
def test_pcgrad_combination_is_the_weighted_sum_of_the_coefficients(kind: str, m: int) -> None:
    # The host path reads w^T C off the recorded moves backwards, without forming C.
    gramian, _ = normalize_gramian(compute_gramian(JACOBIANS[kind](m, m)), min_norm=1e-8)
    priority = torch.rand(m, dtype=torch.float64)
    weights = torch.rand(m, dtype=torch.float64)
    for path in ("host", "tensor"):
        with solver_path(path):
            combination = pcgrad_combination(gramian, priority, weights)
            expected = weights @ pcgrad_coefficients(gramian, priority)
        assert combination.shape == (m,)
        assert relative_error(combination, expected) < 1e-10


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("kind", JACOBIANS)
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_golden_qp_paths_agree(kind: str, m: int, lam: float) -> None:
    normalized, _ = normalize_gramian(compute_gramian(JACOBIANS[kind](m, m)), min_norm=1e-8)
    targets = golden_ratio_weights(m, dtype=torch.float64)
    host, tensor = _both_paths(lambda: solve_golden_qp(normalized, targets, lam, 25, 0.02 / m))
    assert_close(host, tensor, rtol=1e-12, atol=1e-14)


# The scale of the scaled kinds. GCond's eps is both a floor on squared norms (rows with
# |r|^2 < eps are never paired) and a guard in ratios of squared norms. At 1e-12 the floor must
# shrink with the square of the scale, or every row (|r|^2 ~ 1e-24) is blocked and the loop never
# runs; at 1e12 it is already negligible, and scaling it up would swamp the dimensionless guards
# (the remap's weak - main + eps). The norm cap follows the scale, so that it caps the same rows.
GCOND_SCALES = {"scaled 1e12": 1e12, "scaled 1e-12": 1e-12}


def _gcond_inputs(m: int, kind: str) -> tuple[Tensor, ...]:
    """
    A step's Gramian and cross products with a previous step resolved by some coefficients. The
    seed is m + 1: with seed m, the three rows left beside the zero row at m = 4 do not conflict,
    and that case would never iterate.
    """

    jacobian = JACOBIANS[kind](m, m + 1)
    previous = JACOBIANS[kind](m, m + 101)
    previous_coefficients = torch.eye(m, dtype=torch.float64) + 0.3 * torch.randn(
        m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m)
    )
    resolved_before = previous_coefficients @ previous
    # (The floor follows the scale: at 1e-12, a fixed 1e-8 would make every average equal, and
    # the arbitrator's strength scores of capped rows would tie up to rounding.)
    norm_ema = jacobian.norm(dim=1).clamp(min=1e-8 * GCOND_SCALES.get(kind, 1.0)) * 1.5
    return (
        compute_gramian(jacobian),
        jacobian @ resolved_before.T,
        (resolved_before**2).sum(dim=1),
        norm_ema,
    )


GCOND_SETTINGS = {
    "smooth": dict(use_smooth_logic=True, dominance_window=3, norm_cap=None),
    "legacy": dict(use_smooth_logic=False, dominance_window=3, norm_cap=None),
    "smooth, capped, no window": dict(use_smooth_logic=True, dominance_window=0, norm_cap=1.0),
    "legacy, capped, window 1": dict(use_smooth_logic=False, dominance_window=1, norm_cap=0.5),
}


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("kind", JACOBIANS)
@pytest.mark.parametrize("setting", GCOND_SETTINGS)
def test_gcond_resolution_paths_agree(kind: str, m: int, setting: str) -> None:
    gramian, cross, previous_norms_sq, norm_ema = _gcond_inputs(m, kind)
    scale = GCOND_SCALES.get(kind, 1.0)
    norm_cap = GCOND_SETTINGS[setting]["norm_cap"]
    settings = ResolveSettings(
        conflict_thresholds=(-0.8, -0.5, 0.0),
        remap_power=2.0,
        tie_breaking_weights=(0.8, 0.2),
        max_iters=2 * m,
        eps=1e-8 * min(scale, 1.0) ** 2,
        **{  # type: ignore[arg-type]
            **GCOND_SETTINGS[setting],
            "norm_cap": None if norm_cap is None else norm_cap * scale,
        },
    )
    window = settings.dominance_window
    history = torch.tensor([1, 0, 1][:window], dtype=torch.int64)  # a history from earlier steps
    count = torch.tensor(5 if window else 0, dtype=torch.int64)
    results = {}
    for path in ("host", "tensor"):
        results[path] = resolve_conflicts(
            gramian, cross, previous_norms_sq, norm_ema, history, count, settings, path=path
        )
    host, tensor = results["host"], results["tensor"]
    # The resolved gradient sum(R) = 1^T C J, compared through the Gramian: |1^T (C_h - C_t) J|.
    difference = (host.coefficients - tensor.coefficients).sum(dim=0)
    total = host.coefficients.sum(dim=0)
    assert float(difference @ gramian @ difference) <= 1e-20 * max(
        float(total @ gramian @ total), 1e-300
    )
    # Every kind holds conflicting pairs: a case that never iterates compares nothing.
    assert float(host.proj_iters) == float(tensor.proj_iters) > 0
    assert torch.equal(host.history, tensor.history)
    assert torch.equal(host.history_count, tensor.history_count)
    assert_close(
        host.min_cosine_sim, tensor.min_cosine_sim.to(torch.float64), rtol=1e-10, atol=1e-12
    )


# The PCGrad pass against golden-pendulum-mtl, and hand-derived cases.


def test_pcgrad_coefficients_on_a_hand_derived_pair(solver_path: str) -> None:
    # r0 = (1, 0), r1 = (-1, 1): <r0, r1> = -1 < 0. r0 has the lower priority, so
    # r0 <- r0 - (-1 / 2) r1 = (0.5, 0.5), i.e. C = [[1, 0.5], [0, 1]] (up to eps).
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    coefficients = pcgrad_coefficients(matrix @ matrix.T, torch.tensor([0.3, 0.7]), eps=0.0)
    assert_close(coefficients, torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64))

    # On a tie, row j moves: r1 <- r1 - (-1 / 1) r0 = (0, 1).
    coefficients = pcgrad_coefficients(matrix @ matrix.T, torch.tensor([0.5, 0.5]), eps=0.0)
    assert_close(coefficients, torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64))


def test_pcgrad_coefficients_leave_agreeing_rows_alone(solver_path: str) -> None:
    matrix = torch.rand(5, 8, dtype=torch.float64)  # non-negative rows never conflict
    coefficients = pcgrad_coefficients(matrix @ matrix.T, torch.rand(5))
    assert torch.equal(coefficients, torch.eye(5, dtype=torch.float64))


def _priorities(kind: str, m: int, dtype: torch.dtype) -> Tensor:
    generator = torch.Generator().manual_seed(m)
    priority = torch.rand(m, dtype=dtype, generator=generator)
    if kind == "random, a tie":
        priority[m // 2] = priority[0]
    elif kind == "increasing, tied floor":  # Golden Pendulum's: long moves of row i, batches
        priority = priority.sort().values
        priority[: m // 3] = priority[0]
    elif kind == "decreasing":  # every conflict moves the later row: large batches only
        priority = priority.sort(descending=True).values
    return priority


PRIORITY_KINDS = ["random, a tie", "increasing, tied floor", "decreasing"]


@pytest.mark.parametrize("m", [2, 3, 5, 8, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("priority_kind", PRIORITY_KINDS)
def test_pcgrad_coefficients_match_the_golden_pendulum_reference(
    m: int, dtype: torch.dtype, priority_kind: str, solver_path: str
) -> None:
    _check_pcgrad_against_the_reference(m, dtype, priority_kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("priority_kind", PRIORITY_KINDS)
def test_pcgrad_host_path_matches_the_golden_pendulum_reference_beyond_its_window(
    dtype: torch.dtype, priority_kind: str
) -> None:
    # The host path's moves of row i run 16 rows at a time, and rows that move off the same row
    # move one by one, as a slice or by index, depending on how many there are and how sparse:
    # at m = 100, each of the three priorities takes every one of these ways. The tensor path,
    # pair by pair, is checked against the reference up to m = 40 above.
    with solver_path("host"):
        _check_pcgrad_against_the_reference(100, dtype, priority_kind)


def _check_pcgrad_against_the_reference(m: int, dtype: torch.dtype, priority_kind: str) -> None:
    matrix = conflicting_jacobian(m, 2 * m + 30, seed=m, decades=0.0, dtype=dtype)
    priority = _priorities(priority_kind, m, dtype)

    coefficients = pcgrad_coefficients(compute_gramian(matrix), priority)

    expected = _pcgrad_resolve(matrix, priority)
    tolerance = _pcgrad_tolerance(matrix, priority)
    assert relative_error(coefficients.to(dtype) @ matrix, expected) < tolerance
    combination = pcgrad_combination(compute_gramian(matrix), priority, priority)
    assert relative_error(combination.to(dtype) @ matrix, priority @ expected) < tolerance


def _pcgrad_tolerance(matrix: Tensor, priority: Tensor) -> float:
    r"""
    :math:`4 m \kappa \epsilon`, with :math:`\epsilon` the rounding unit of the matrix's dtype.

    The kernels resolve the rows from the Gramian, whose entries carry rounding of about
    :math:`\epsilon \|J_a\| \|J_b\|`. A resolved row :math:`r_k = c_k J` reads it through its
    coefficients, so its error relative to the longest row grows with :math:`\kappa = \max_k
    \|c_k\| \max_j \|J_j\| / \|r_k\|` (a row resolved to a short remainder of long ones), and
    each of its up to :math:`m - 1` moves adds its own. :math:`c_k` are read off the reference's
    rows resolved in float64, so the bound is the problem's, not the implementation's.
    (Measured: at most 0.52 :math:`m \kappa \epsilon`, on any of the CPU kernels tried.)
    """

    rows = matrix.double()
    resolved = _pcgrad_resolve(rows, priority.double())
    coefficients = resolved @ torch.linalg.pinv(rows)
    lengths = resolved.norm(dim=1).clamp(min=torch.finfo(torch.float64).tiny)
    kappa = float((coefficients.norm(dim=1) / lengths).max() * rows.norm(dim=1).max())
    return 4.0 * matrix.shape[0] * kappa * torch.finfo(matrix.dtype).eps


@pytest.mark.parametrize("m", [2, 5, 16, 40])
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_golden_qp_matches_the_golden_pendulum_reference(
    m: int, lam: float, solver_path: str
) -> None:
    normalized, _ = normalize_gramian(
        compute_gramian(conflicting_jacobian(m, 64, seed=m, decades=4.0)), min_norm=1e-8
    )
    targets = golden_ratio_weights(m, dtype=torch.float64)
    alpha = solve_golden_qp(normalized, targets, lam, 25, 0.02 / m)
    expected = _solve_golden_qp(normalized, targets, lam=lam, n_iter=25, min_weight_fraction=0.02)
    assert_close(alpha, expected, rtol=1e-12, atol=1e-15)


def test_golden_qp_without_floor_skips_a_step_that_would_zero_every_weight(
    solver_path: str,
) -> None:
    """
    Sixteen aligned gradients and uniform targets: the first step takes every alpha_k below zero
    (1/16 - 0.05 * 2 < 0). The reference then divides zero by zero; here that step is skipped,
    and the later ones, with smaller steps, proceed.
    """

    gramian = torch.ones(16, 16, dtype=torch.float64)
    targets = torch.full((16,), 1.0 / 16, dtype=torch.float64)
    reference = _solve_golden_qp(gramian, targets, lam=0.0, n_iter=25, min_weight_fraction=0.0)
    assert reference.isnan().all()
    assert_close(solve_golden_qp(gramian, targets, 0.0, 1, 0.0), targets)  # skipped
    alpha = solve_golden_qp(gramian, targets, 0.0, 25, 0.0)
    assert alpha.isfinite().all()
    assert float(alpha.sum()) == pytest.approx(1.0)


# The choice of path.


def test_the_path_follows_the_device_the_argument_and_the_context() -> None:
    cpu = torch.zeros(2, 2)
    meta = torch.zeros(2, 2, device="meta")
    assert chosen_path(cpu) == "host"
    assert chosen_path(meta) == "tensor"
    assert chosen_path(cpu, "tensor") == "tensor"
    with solver_path("tensor"):
        assert chosen_path(cpu) == "tensor"
        assert chosen_path(cpu, "host") == "host"  # an explicit argument wins
        with solver_path("auto"):
            assert chosen_path(cpu) == "host"
        assert chosen_path(cpu) == "tensor"
    assert chosen_path(cpu) == "host"  # the context is restored


def test_compiling_always_takes_the_tensor_path() -> None:
    seen = []

    def probe(x: Tensor) -> Tensor:
        seen.append(chosen_path(x, "host"))
        return x + 1

    torch._dynamo.reset()
    with solver_path("host"):
        torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == ["tensor"]


@pytest.mark.parametrize("path", ["gpu", "", None, 1])
def test_an_unknown_path_is_named(path: object) -> None:
    with pytest.raises(ValueError, match="solver path"), solver_path(path):  # type: ignore[arg-type]
        pass
    if path is not None:
        with pytest.raises(ValueError, match="solver path"):
            chosen_path(torch.zeros(1), path)  # type: ignore[arg-type]
