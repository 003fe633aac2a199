from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import GABA, GABAWeighting
from torchjd_golden.aggregation._gaba import inverse_norm_weights

from .._asserts import (
    assert_linear_under_scaling,
)
from .._inputs import conflicting_jacobian


class SeedGABA:
    """The seed's GABALoss update for K tasks, on Python floats, as the oracle."""

    def __init__(self, n_tasks: int, beta: float, warmup_steps: int, min_weight: float) -> None:
        self.beta, self.warmup_steps, self.min_weight = beta, warmup_steps, min_weight
        self.ema = [1.0 / n_tasks] * n_tasks
        self.step_count = 0

    def __call__(self, norms: list[float]) -> list[float]:
        k = len(norms)
        self.step_count += 1
        if self.step_count <= self.warmup_steps:
            return [1.0 / k] * k
        total = sum(norms) + 1e-12
        raw = [(total - g) / ((k - 1) * total) for g in norms] if k > 1 else [1.0]
        self.ema = [
            self.beta * e + (1.0 - self.beta) * r for e, r in zip(self.ema, raw, strict=True)
        ]
        floored = [max(e, self.min_weight) for e in self.ema]
        return [f / sum(floored) for f in floored]


def test_seed_smoke_test_through_torchjd() -> None:
    """
    The seed's five-step smoke test (warm-up 2, no optimizer step), run through
    ``autojac.backward`` on the backbone and ``jac_to_grad``, prints the seed's numbers.
    """

    torch.manual_seed(0)
    backbone = nn.Linear(14, 32)
    rul_head = nn.Linear(32, 1)
    health_head = nn.Linear(32, 3)
    gaba = GABA(beta=0.99, warmup_steps=2, min_weight=0.05)
    x = torch.randn(64, 14)
    rul_target = torch.rand(64, 1) * 125.0
    health_target = torch.randint(0, 3, (64,))
    lines = []

    for step in range(5):
        features = backbone(x)
        rul_loss = ((rul_head(features) - rul_target) ** 2).mean()
        health_loss = nn.functional.cross_entropy(health_head(features), health_target)
        backward([rul_loss, health_loss], inputs=list(backbone.parameters()))
        jac_to_grad(list(backbone.parameters()), gaba)
        ema = gaba.gramian_weighting.ema_weights
        lines.append(
            f"step {step} | rul_loss = {rul_loss.item():7.2f} | health_loss = "
            f"{health_loss.item():.4f} | lambda = ({ema[0]:.4f}, {ema[1]:.4f})"
        )

    assert lines == [
        "step 0 | rul_loss = 4521.15 | health_loss = 1.1936 | lambda = (0.5000, 0.5000)",
        "step 1 | rul_loss = 4521.15 | health_loss = 1.1936 | lambda = (0.5000, 0.5000)",
        "step 2 | rul_loss = 4521.15 | health_loss = 1.1936 | lambda = (0.4950, 0.5050)",
        "step 3 | rul_loss = 4521.15 | health_loss = 1.1936 | lambda = (0.4901, 0.5099)",
        "step 4 | rul_loss = 4521.15 | health_loss = 1.1936 | lambda = (0.4853, 0.5147)",
    ]


def test_raw_weights_of_the_seed_example() -> None:
    """The seed's NumPy example: norms 5.0 and 0.01 (a 500x ratio) give 0.0020 and 0.9980."""

    weights = inverse_norm_weights(torch.tensor([5.0, 0.01], dtype=torch.float64))
    assert [f"{w:.4f}" for w in weights.tolist()] == ["0.0020", "0.9980"]
    closed_form = torch.tensor([0.01 / 5.01, 5.0 / 5.01], dtype=torch.float64)
    assert_close(weights, closed_form)


@pytest.mark.parametrize("n_tasks", [2, 3, 7])
def test_raw_weight_properties(n_tasks: int) -> None:
    norms = torch.rand(n_tasks, dtype=torch.float64) * 10.0
    weights = inverse_norm_weights(norms)
    assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (weights >= 0.0).all()
    assert torch.equal(torch.argsort(weights), torch.argsort(-norms))  # inverse-monotonic
    equal = inverse_norm_weights(torch.full((n_tasks,), 2.5, dtype=torch.float64))
    assert_close(equal, torch.full((n_tasks,), 1.0 / n_tasks, dtype=torch.float64))


@pytest.mark.parametrize("n_tasks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize(
    ("beta", "warmup_steps", "min_weight"),
    [(0.99, 100, 0.05), (0.9, 3, 0.05), (0.5, 0, 0.2), (0.0, 1, 0.0)],
)
def test_sequences_follow_the_seed_formula(
    n_tasks: int, beta: float, warmup_steps: int, min_weight: float
) -> None:
    weighting = GABAWeighting(beta=beta, warmup_steps=warmup_steps, min_weight=min_weight)
    oracle = SeedGABA(n_tasks, beta, warmup_steps, min_weight)

    for step in range(120):
        jacobian = conflicting_jacobian(n_tasks, 20, seed=step, decades=5.0)
        weights = weighting(jacobian @ jacobian.T)
        expected = oracle(jacobian.norm(dim=1).tolist())
        assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
        assert_close(weighting.ema_weights, torch.tensor(oracle.ema, dtype=torch.float64))
    assert int(weighting.step_count) == 120


def test_warmup_gives_uniform_weights_and_leaves_the_average_alone() -> None:
    weighting = GABAWeighting(warmup_steps=3)
    jacobian = torch.tensor([[100.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    for _ in range(3):
        assert_close(weighting(jacobian @ jacobian.T), torch.full((3,), 1.0 / 3.0))
        assert_close(weighting.ema_weights, torch.full((3,), 1.0 / 3.0))
    weights = weighting(jacobian @ jacobian.T)
    assert weights[0] < weights[2] < weights[1]  # the loud task gets the least weight


def test_one_task_gives_weight_one() -> None:
    weighting = GABAWeighting(warmup_steps=0)
    for scale in (1e-6, 1.0, 1e6):
        assert torch.equal(weighting(torch.tensor([[scale]])), torch.ones(1))


def test_floor_then_renormalise() -> None:
    """After many steps at a 1e6 ratio the raw weight of the loud task is ~1e-6: floored."""

    weighting = GABAWeighting(beta=0.0, warmup_steps=0, min_weight=0.05)
    jacobian = torch.tensor([[1e3, 0.0], [0.0, 1e-3]], dtype=torch.float64)
    weights = weighting(jacobian @ jacobian.T)
    raw = inverse_norm_weights(torch.tensor([1e3, 1e-3], dtype=torch.float64))
    expected = raw.clamp(min=0.05) / raw.clamp(min=0.05).sum()
    assert_close(weights, expected)
    assert_close(weighting.ema_weights, raw)  # the state keeps the unfloored average


def test_invariant_to_a_uniform_scale_but_not_linear_under_row_scaling() -> None:
    """The documented exception: scaling one row changes its norm and so every weight."""

    jacobian = conflicting_jacobian(4, 12, seed=2, decades=2.0)
    weights = GABAWeighting(beta=0.0, warmup_steps=0)(jacobian @ jacobian.T)
    scaled = GABAWeighting(beta=0.0, warmup_steps=0)(1e4 * jacobian @ jacobian.T)
    assert_close(scaled, weights)
    with pytest.raises(AssertionError):
        assert_linear_under_scaling(GABA(beta=0.0, warmup_steps=0), jacobian, tol=1e-3)
