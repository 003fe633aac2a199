from __future__ import annotations

import math

import pytest
import torch
from golden_pendulum import golden_nash_backward
from golden_pendulum import golden_ratio_weights as reference_golden_ratio_weights
from golden_pendulum.pro import AdaptiveLambda
from torch import Tensor, nn
from torch.testing import assert_close
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import (
    PHI,
    AdaptiveGoldenPendulum,
    AdaptiveGoldenPendulumWeighting,
    GoldenPendulum,
    GoldenPendulumWeighting,
    golden_ratio_weights,
)
from torchjd_golden.aggregation._adaptive_lambda import step_loss_ratio

from .._asserts import (
    assert_permutation_invariant,
    relative_error,
)
from .._inputs import conflicting_jacobian
from .._knife_edge import golden_reference_step, tight_tolerance

SETTINGS = [
    {"lam": 0.5, "n_iter": 25, "min_weight_fraction": 0.02, "pcgrad": True},
    {"lam": 0.0, "n_iter": 25, "min_weight_fraction": 0.02, "pcgrad": True},
    {"lam": 2.0, "n_iter": 10, "min_weight_fraction": 0.1, "pcgrad": False},
    {"lam": 0.1, "n_iter": 60, "min_weight_fraction": 0.5, "pcgrad": True},
    {"lam": 1.0, "n_iter": 0, "min_weight_fraction": 0.02, "pcgrad": True},
]


def reference_gradient(jacobian: Tensor, **settings: object) -> tuple[Tensor, Tensor]:
    """
    The gradient and the weights that ``golden_nash_backward`` gives for ``jacobian``: the loss
    of task k is linear in one parameter vector, with gradient row k.
    """

    parameter = nn.Parameter(torch.zeros(jacobian.shape[1], dtype=jacobian.dtype))
    model = nn.Module()
    model.parameter = parameter
    losses = {f"task{k}": row @ parameter for k, row in enumerate(jacobian)}
    alpha = golden_nash_backward(losses, model, **settings)  # type: ignore[arg-type]
    assert parameter.grad is not None
    return parameter.grad, torch.tensor(list(alpha.values()), dtype=torch.float64)


@pytest.mark.parametrize("n_tasks", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_golden_ratio_weights_equal_the_reference(n_tasks: int, dtype: torch.dtype) -> None:
    expected = reference_golden_ratio_weights(n_tasks, dtype=dtype)
    assert torch.equal(golden_ratio_weights(n_tasks, dtype=dtype), expected)


@pytest.mark.parametrize("n_tasks", [184, 186, 200, 512])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_golden_ratio_weights_of_many_tasks_do_not_overflow(
    n_tasks: int, dtype: torch.dtype
) -> None:
    """The float32 powers phi^k overflow from k = 185: the targets used to come out 0 or NaN."""

    weights = golden_ratio_weights(n_tasks, dtype=dtype)
    exact = golden_ratio_weights(n_tasks, dtype=torch.float64)
    assert weights.isfinite().all()
    assert relative_error(weights, exact) <= torch.finfo(dtype).eps  # float64's, rounded
    assert abs(float(exact.sum()) - 1.0) < 1e-12
    assert float(exact[-1]) == pytest.approx(1.0 - 1.0 / PHI, rel=1e-12)  # the limit 0.382
    ratios = exact[-20:][1:] / exact[-20:][:-1]
    torch.testing.assert_close(ratios, torch.full((19,), PHI, dtype=torch.float64))


def test_golden_ratio_weights_of_the_paper_table() -> None:
    """
    The K=2 and K=4 rows of the seed's table. Its K=3, 8 and 16 rows disagree with its own
    formula and with the reference package (the K=3 row sums to 0.976), so they are not used.
    """

    assert_close(golden_ratio_weights(2), torch.tensor([0.382, 0.618]), atol=5e-4, rtol=0.0)
    four = golden_ratio_weights(4)
    assert_close(four, torch.tensor([0.106, 0.171, 0.276, 0.447]), atol=5e-4, rtol=0.0)
    assert abs(float(four[0] / four[-1]) - 0.236) < 1e-3
    ratios = golden_ratio_weights(8)[1:] / golden_ratio_weights(8)[:-1]
    assert_close(ratios, torch.full((7,), (1.0 + 5.0**0.5) / 2.0))


@pytest.mark.parametrize("n_tasks", [0, -1, 2.0, True])
def test_golden_ratio_weights_reject_bad_task_counts(n_tasks: object) -> None:
    with pytest.raises(ValueError, match="n_tasks"):
        golden_ratio_weights(n_tasks)  # type: ignore[arg-type]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_golden_nash_backward(
    m: int, settings: dict[str, object], dtype: torch.dtype, solver_path: str
) -> None:
    """
    The gradient and alpha of golden_nash_backward to 16 m units of the dtype's rounding; where
    the reference's QP reads a sign within rounding of zero (float32 at m = 3 with the fourth
    settings: |alpha_k - target_k| = 5e-8 at one step), those of one of its branches, the
    results the reference gives on one CPU or another (tests/_knife_edge.py).
    """

    jacobian = conflicting_jacobian(m, 48, seed=17 * m, decades=6.0, dtype=dtype)
    expected_gradient, expected_alpha = reference_gradient(jacobian, **settings)
    aggregator = GoldenPendulum(**settings)  # type: ignore[arg-type]
    tolerance = tight_tolerance(m, dtype)

    gradient = aggregator(jacobian)

    assert gradient.dtype == dtype
    if m > 1:
        step = golden_reference_step(jacobian, **settings)  # type: ignore[arg-type]
        assert relative_error(step.outcome.gradient, expected_gradient) <= tolerance
        assert relative_error(step.outcome.alpha, expected_alpha) <= tolerance
        branch = step.expected(gradient)
        expected_gradient, expected_alpha = branch.gradient, branch.alpha
    assert relative_error(gradient, expected_gradient) <= tolerance
    assert relative_error(aggregator.alpha, expected_alpha) <= tolerance
    expected_balance = expected_alpha.min() / expected_alpha.max()
    assert abs(float(aggregator.balance_ratio) - float(expected_balance)) <= tolerance


def test_weights_combine_the_original_rows(solver_path: str) -> None:
    jacobian = conflicting_jacobian(5, 30, seed=3)
    weighting = GoldenPendulumWeighting()
    weights = weighting(jacobian @ jacobian.T)
    assert_close(weights @ jacobian, GoldenPendulum()(jacobian))


def test_one_task_gives_the_raw_gradient() -> None:
    jacobian = 1e3 * torch.randn(1, 10)
    assert torch.equal(GoldenPendulum()(jacobian), jacobian[0])
    assert torch.equal(GoldenPendulumWeighting()(jacobian @ jacobian.T), torch.ones(1))


def test_zero_row_gets_zero_weight_and_matches_reference(solver_path: str) -> None:
    jacobian = conflicting_jacobian(4, 30, seed=8)
    jacobian[2] = 0.0
    weights = GoldenPendulumWeighting()(jacobian @ jacobian.T)
    assert weights[2] == 0.0
    expected, _ = reference_gradient(jacobian)
    assert relative_error(weights @ jacobian, expected) <= tight_tolerance(4, torch.float64)


@pytest.mark.parametrize("poison", [torch.inf, torch.nan])
def test_non_finite_jacobian_gives_nan_weights(poison: float) -> None:
    jacobian = torch.randn(3, 10)
    jacobian[1, 4] = poison
    assert GoldenPendulumWeighting()(jacobian @ jacobian.T).isnan().all()
    assert not GoldenPendulum()(jacobian).isfinite().any()


def test_not_permutation_invariant() -> None:
    """The documented exception: targets grow with the task index and PCGrad goes in order."""

    jacobian = conflicting_jacobian(4, 20, seed=5, decades=0.0)
    with pytest.raises(AssertionError):
        assert_permutation_invariant(GoldenPendulum(), jacobian, tol=1e-3)


def test_trains_like_golden_nash_backward() -> None:
    """
    Same parameter gradients, step after step, as the reference's own backward, to 16 m units of
    float64 rounding. (In float64: a float32 QP may read a sign within rounding of zero, where
    the reference's own result depends on the CPU, and the runs' parameters then part.)
    """

    def make_model() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    ours, theirs = make_model(), make_model()
    aggregator = GoldenPendulum()
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.05) for model in (ours, theirs)]
    scales = torch.tensor([300.0, 1.0, 0.01], dtype=torch.float64)
    tolerance = tight_tolerance(3, torch.float64)

    for _ in range(5):
        inputs = torch.randn(32, 6, dtype=torch.float64)
        targets = torch.randn(32, 3, dtype=torch.float64)
        for optimizer in optimizers:
            optimizer.zero_grad()
        our_losses = scales * ((ours(inputs) - targets) ** 2).mean(dim=0)
        backward(our_losses)
        jac_to_grad(ours.parameters(), aggregator)
        their_losses = scales * ((theirs(inputs) - targets) ** 2).mean(dim=0)
        golden_nash_backward({str(k): loss for k, loss in enumerate(their_losses)}, theirs)

        for mine, reference in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert mine.grad is not None
            assert reference.grad is not None
            assert relative_error(mine.grad, reference.grad) <= tolerance
        for optimizer in optimizers:
            optimizer.step()


@pytest.mark.parametrize(
    "settings",
    [{}, {"loss_ratio_aware": False, "sensitivity": 5.0}, {"lam_max": 50.0, "ema_decay": 0.5}],
    ids=["defaults", "conflict-driven", "wide-bounds"],
)
def test_adaptive_follows_adaptive_lambda_over_fifty_steps(settings: dict[str, object]) -> None:
    """
    lambda and the gradients of AdaptiveLambda.backward, step after step, to 16 m units of
    float64 rounding (float64 for the reason of test_trains_like_golden_nash_backward: with
    float32, a step's |alpha_k - target_k| comes within 3 units of float32 rounding).
    """

    def make_model() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()

    ours, theirs = make_model(), make_model()
    aggregator = AdaptiveGoldenPendulum(**settings)  # type: ignore[arg-type]
    reference = AdaptiveLambda(**settings)  # type: ignore[arg-type]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.02) for model in (ours, theirs)]
    scales = torch.tensor([200.0, 1.0, 0.05, 3.0], dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    tolerance = tight_tolerance(4, torch.float64)
    lams = []

    for _ in range(50):
        inputs = torch.randn(16, 5, dtype=torch.float64)
        targets = torch.randn(16, 4, dtype=torch.float64) * signs
        for optimizer in optimizers:
            optimizer.zero_grad()
        our_losses = scales * ((ours(inputs) - targets) ** 2).mean(dim=0)
        backward(our_losses)
        aggregator.losses = our_losses
        jac_to_grad(ours.parameters(), aggregator)
        their_losses = scales * ((theirs(inputs) - targets) ** 2).mean(dim=0)
        reference.backward({str(k): loss for k, loss in enumerate(their_losses)}, theirs)

        assert float(aggregator.current_lam) == pytest.approx(reference.current_lam, rel=tolerance)
        assert abs(float(aggregator.conflict_ratio) - reference.conflict_ratio) <= tolerance
        assert float(aggregator.loss_ratio) == pytest.approx(reference.loss_ratio, rel=tolerance)
        for mine, theirs_parameter in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert mine.grad is not None
            assert theirs_parameter.grad is not None
            assert relative_error(mine.grad, theirs_parameter.grad) <= tolerance
        lams.append(reference.current_lam)
        for optimizer in optimizers:
            optimizer.step()

    assert len(set(lams)) >= 3  # lambda really moved


def test_adaptive_needs_the_losses_when_loss_ratio_aware() -> None:
    gramian = torch.eye(3)
    with pytest.raises(ValueError, match="losses"):
        AdaptiveGoldenPendulumWeighting()(gramian)
    weighting = AdaptiveGoldenPendulumWeighting()
    weighting.losses = torch.ones(2)
    with pytest.raises(ValueError, match="Expected 3 losses"):
        weighting(gramian)
    unaware = AdaptiveGoldenPendulumWeighting(loss_ratio_aware=False)
    assert unaware(gramian).isfinite().all()
    assert float(unaware.loss_ratio) == 1.0


def test_adaptive_losses_are_used_once() -> None:
    weighting = AdaptiveGoldenPendulumWeighting()
    weighting.losses = [torch.tensor(1.0), torch.tensor(2.0), 3.0]
    weighting(torch.eye(3))
    assert weighting.losses is None
    with pytest.raises(ValueError, match="losses"):
        weighting(torch.eye(3))


def test_adaptive_rejects_bad_losses() -> None:
    weighting = AdaptiveGoldenPendulumWeighting()
    with pytest.raises(ValueError, match="losses"):
        weighting.losses = torch.ones(2, 2)
    with pytest.raises(ValueError, match="losses"):
        weighting.losses = torch.ones(3, dtype=torch.int64)


def test_adaptive_loss_ratio_is_that_of_positive_losses() -> None:
    """max / max(min, 1e-10) for positive losses (the reference's floor); NaN otherwise."""

    def ratio(*losses: float) -> float:
        return float(step_loss_ratio(torch.tensor(losses, dtype=torch.float64)))

    assert ratio(3.0, 0.5, 1.5) == 6.0
    assert ratio(2.0, 1e-12) == 2.0 / 1e-10
    assert math.isnan(ratio(2.0, 0.0, 1.0))
    assert math.isnan(ratio(-1.0, 3.0))
    assert math.isnan(ratio(-3.0, -1.0))


def test_adaptive_keeps_the_loss_ratio_at_steps_with_non_positive_losses() -> None:
    """
    Three tasks with orthogonal gradients (no conflict), beta = 0.5, c* = 0.3, s = 1. A zero loss,
    then a negative one, leave r = 1 (the reference would take 2/1e-10, then 3/1e-10) and lambda
    follows the conflicts alone; positive losses then move r again. By hand:
    c_t = 0.3 / 2^t, lambda_t = lambda_{t-1} exp(0.1 (c_t - 0.3)) (1 + 0.1 log r_t)^[r_t > 1].
    """

    weighting = AdaptiveGoldenPendulumWeighting(ema_decay=0.5)
    gramian = torch.eye(3, dtype=torch.float64)
    lam, r = 0.5, 1.0
    steps = [(2.0, 0.0, 1.0), (-1.0, 3.0, 2.0), (4.0, 1.0, 2.0)]
    for t, losses in enumerate(steps, start=1):
        weighting.losses = torch.tensor(losses, dtype=torch.float64)
        weighting(gramian)
        if min(losses) > 0.0:
            r = 0.5 * r + 0.5 * max(losses) / min(losses)
        lam *= math.exp(0.1 * (0.3 / 2**t - 0.3)) * (1.0 + 0.1 * math.log(r) if r > 1.0 else 1.0)
        eps = torch.finfo(torch.float64).eps
        assert float(weighting.loss_ratio) == pytest.approx(r, rel=4 * eps)
        assert float(weighting.current_lam) == pytest.approx(lam, rel=16 * t * eps)
    assert r == 2.5


def test_adaptive_with_one_task_leaves_the_state_alone() -> None:
    weighting = AdaptiveGoldenPendulumWeighting()
    assert torch.equal(weighting(torch.eye(1)), torch.ones(1))
    assert not weighting.state_dict()["step_count"].numel()


def test_no_floor_is_accepted_and_matches_the_reference() -> None:
    """min_weight_fraction=0 (no floor), which golden-pendulum-mtl accepts, gives its numbers."""

    tolerance = tight_tolerance(6, torch.float64)
    for seed in range(4):
        jacobian = conflicting_jacobian(6, 40, seed=seed, decades=3.0)
        expected_gradient, expected_alpha = reference_gradient(jacobian, min_weight_fraction=0.0)
        aggregator = GoldenPendulum(min_weight_fraction=0.0)
        assert relative_error(aggregator(jacobian), expected_gradient) <= tolerance
        assert relative_error(aggregator.alpha, expected_alpha) <= tolerance
