"""Training under a GradScaler whose scale changes gives the trajectory of unscaled training."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torchjd.aggregation import Aggregator, UPGrad
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from torchjd_golden import GABA, ExcessMTL, GCond, GoldenPendulum, with_grad_scaler
from torchjd_golden.step._amp import UnscaledAggregator, UnscaledWeighting

from .._methods import AGGREGATORS

N_STEPS = 12
OVERFLOW_STEPS = {5, 9}  # an inf loss: the scaler skips the step and halves its scale

# The aggregators that need no extra input (the adaptive λ's losses are not those of this loop).
METHODS: dict[str, Callable[[], Aggregator]] = {
    method.name: method.make for method in AGGREGATORS if not method.needs_extra_inputs
}


def _trajectory(make: Callable[[], Aggregator], scaling: str) -> tuple[list[Tensor], list[float]]:
    """
    Parameters after every step. ``scaling``: "none" (float32, overflow steps left out), "plain"
    (torchjd's documented AMP pattern) or "wrapped" (with_grad_scaler).
    """

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(3)])
    parameters = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.01)
    aggregator = make()
    scaler = GradScaler("cpu", init_scale=2.0**6, growth_interval=2, enabled=scaling != "none")
    used = with_grad_scaler(aggregator, scaler) if scaling == "wrapped" else aggregator
    generator = torch.Generator().manual_seed(1)
    trajectory, scales = [], []

    for step in range(N_STEPS):
        x, y = torch.randn(32, 6, generator=generator), torch.randn(32, 3, generator=generator)
        if scaling == "none" and step in OVERFLOW_STEPS:
            continue  # what the scaler's skip amounts to
        features = trunk(x)
        losses = [
            scale * ((head(features)[:, 0] - target) ** 2).mean()
            for scale, head, target in zip((10.0, 1.0, 0.1), heads, y.T, strict=True)
        ]
        if step in OVERFLOW_STEPS:
            losses[1] = losses[1] * torch.inf
        mtl_backward(scaler.scale(losses) if scaler.is_enabled() else losses, features=features)
        jac_to_grad(trunk.parameters(), used)
        scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        trajectory.append(torch.cat([p.detach().flatten() for p in parameters]))
    if scaling != "none":  # the skipped steps left the parameters unchanged
        trajectory = [p for step, p in enumerate(trajectory) if step not in OVERFLOW_STEPS]
    return trajectory, scales


@pytest.mark.parametrize("name", METHODS)
def test_the_wrapper_follows_unscaled_training(name: str) -> None:
    expected, _ = _trajectory(METHODS[name], "none")
    actual, scales = _trajectory(METHODS[name], "wrapped")
    assert len(set(scales)) >= 3  # the scale grew and backed off during the run
    assert len(actual) == len(expected) == N_STEPS - len(OVERFLOW_STEPS)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_the_plain_pattern_is_wrong_for_golden_pendulum() -> None:
    """Golden Pendulum is scale-free: the scaler then divides its update by the scale."""

    expected, _ = _trajectory(GoldenPendulum, "none")
    actual, _ = _trajectory(GoldenPendulum, "plain")
    assert (actual[-1] - expected[-1]).abs().max() > 1e-2


def test_the_plain_pattern_is_fine_for_a_positively_homogeneous_aggregator() -> None:
    expected, _ = _trajectory(UPGrad, "none")
    for scaling in ("plain", "wrapped"):
        actual, _ = _trajectory(UPGrad, scaling)
        torch.testing.assert_close(actual[-1], expected[-1], rtol=1e-4, atol=1e-5)


def test_which_wrapper_each_aggregator_gets() -> None:
    scaler = GradScaler("cpu")
    gramian_based = with_grad_scaler(GoldenPendulum(), scaler)
    assert isinstance(gramian_based.gramian_weighting, UnscaledWeighting)  # type: ignore[attr-defined]
    assert gramian_based.gramian_weighting.power == 2  # type: ignore[attr-defined]
    assert with_grad_scaler(ExcessMTL(), scaler).weighting.power == 1  # type: ignore[attr-defined]
    assert isinstance(with_grad_scaler(GCond(), scaler), UnscaledAggregator)


def test_the_wrapper_shares_the_state_and_works_with_the_optimized_gramian() -> None:
    scaler = GradScaler("cpu", init_scale=8.0)
    gaba = GABA(warmup_steps=0)
    wrapped = with_grad_scaler(gaba, scaler)
    parameter = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    losses = torch.stack([parameter.sum(), (parameter**2).sum()])
    backward(scaler.scale(losses))
    jac_to_grad([parameter], wrapped, optimize_gramian_computation=True)
    assert int(gaba.gramian_weighting.step_count) == 1
    unscaled = GABA(warmup_steps=0)(torch.stack([torch.ones(3), 2 * parameter.detach()]))
    torch.testing.assert_close(parameter.grad / 8.0, unscaled)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_wrapper_reads_as_the_call_that_made_it(name: str) -> None:
    aggregator = METHODS[name]()
    assert repr(with_grad_scaler(aggregator, GradScaler("cpu"))) == (
        f"with_grad_scaler({aggregator!r})"
    )
