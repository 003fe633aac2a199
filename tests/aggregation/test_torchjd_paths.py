"""Every method works in every torchjd path and gives the same update in each."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close
from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator
from torchjd.autogram import Engine
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from .._methods import AGGREGATORS, Method, weighting_of

TASK_SCALES = torch.tensor([300.0, 1.0, 0.01])
N_STEPS = 4

METHODS = AGGREGATORS
GRAMIAN_METHODS = [m for m in METHODS if isinstance(m.make(), GramianWeightedAggregator)]


def _set_extra_inputs(method: Method, module: nn.Module, losses: Tensor) -> None:
    """The step's real losses, for the methods that take them (the adaptive λ)."""

    if method.needs_extra_inputs:
        module.losses = losses  # type: ignore[assignment]


def _model() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 5, generator=generator), torch.randn(16, 3, generator=generator)


def _task_losses(output: Tensor, target: Tensor) -> Tensor:
    return TASK_SCALES * ((output - target) ** 2).mean(dim=0)


def _jacobian(losses: Tensor, parameters: list[nn.Parameter]) -> Tensor:
    """The Jacobian of ``losses`` with respect to ``parameters``, by plain autograd."""

    rows = []
    for loss in losses:
        gradients = torch.autograd.grad(loss, parameters, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in gradients]))
    return torch.stack(rows)


def _gradient(parameters: list[nn.Parameter]) -> Tensor:
    grads = [p.grad for p in parameters]
    assert all(g is not None for g in grads)
    return torch.cat([g.flatten() for g in grads if g is not None])


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_jac_to_grad_after_backward(method: Method) -> None:
    model = _model()
    parameters = list(model.parameters())
    aggregator, oracle = method.make(), method.make()
    oracle_weights: list[Tensor] = []
    oracle.weighting.register_forward_hook(lambda _m, _i, output: oracle_weights.append(output))  # type: ignore[operator]

    for step in range(N_STEPS):
        losses = _task_losses(model(_batch(step)[0]), _batch(step)[1])
        jacobian = _jacobian(losses, parameters)
        backward(losses)
        _set_extra_inputs(method, aggregator, losses)
        weights = jac_to_grad(parameters, aggregator)

        _set_extra_inputs(method, oracle, losses)
        assert_close(_gradient(parameters), oracle(jacobian))
        if isinstance(aggregator, WeightedAggregator):  # the weights are the update's
            assert weights is not None
            assert_close(weights, oracle_weights[-1])
            assert_close(weights @ jacobian, _gradient(parameters))
        else:  # GCond: its momentum is no combination of the rows
            assert weights is None
        model.zero_grad()


@pytest.mark.parametrize("method", GRAMIAN_METHODS, ids=str)
def test_jac_to_grad_with_optimized_gramian_computation(method: Method) -> None:
    model = _model()
    parameters = list(model.parameters())
    plain, optimized = method.make(), method.make()

    for step in range(N_STEPS):
        inputs, targets = _batch(step)
        gradients = []
        for aggregator, optimize in ((plain, False), (optimized, True)):
            losses = _task_losses(model(inputs), targets)
            backward(losses)
            _set_extra_inputs(method, aggregator, losses)
            jac_to_grad(parameters, aggregator, optimize_gramian_computation=optimize)  # type: ignore[call-overload]
            gradients.append(_gradient(parameters))
            model.zero_grad()
        assert_close(gradients[1], gradients[0])


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_mtl_backward(method: Method) -> None:
    torch.manual_seed(7)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])
    shared = list(trunk.parameters())
    aggregator, oracle = method.make(), method.make()

    for step in range(N_STEPS):
        inputs, targets = _batch(step)
        features = trunk(inputs)
        task_losses = [
            scale * ((head(features)[:, 0] - target) ** 2).mean()
            for scale, head, target in zip(TASK_SCALES, heads, targets.T, strict=True)
        ]
        losses = torch.stack(task_losses).detach()
        jacobian = _jacobian(torch.stack(task_losses), shared)
        head_gradients = [
            torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
            for loss, head in zip(task_losses, heads, strict=True)
        ]

        mtl_backward(task_losses, features=features)
        _set_extra_inputs(method, aggregator, losses)
        jac_to_grad(shared, aggregator)

        _set_extra_inputs(method, oracle, losses)
        assert_close(_gradient(shared), oracle(jacobian))
        for head, expected in zip(heads, head_gradients, strict=True):
            for parameter, gradient in zip(head.parameters(), expected, strict=True):
                assert_close(parameter.grad, gradient)
        trunk.zero_grad()
        heads.zero_grad()


@pytest.mark.parametrize("method", GRAMIAN_METHODS, ids=str)
def test_autogram_engine(method: Method) -> None:
    """The weighting on the engine's Gramian, then ``losses.backward(weights)``, as autojac."""

    engine_model, autojac_model = _model(), _model()
    engine = Engine(engine_model, batch_dim=None)
    weighting = weighting_of(method.make())
    aggregator = method.make()

    for step in range(N_STEPS):
        inputs, targets = _batch(step)
        losses = _task_losses(engine_model(inputs), targets)
        gramian = engine.compute_gramian(losses)
        _set_extra_inputs(method, weighting, losses)
        losses.backward(weighting(gramian))

        losses = _task_losses(autojac_model(inputs), targets)
        backward(losses)
        _set_extra_inputs(method, aggregator, losses)
        jac_to_grad(list(autojac_model.parameters()), aggregator)

        expected = _gradient(list(autojac_model.parameters()))
        assert_close(_gradient(list(engine_model.parameters())), expected, rtol=1e-4, atol=1e-6)
        engine_model.zero_grad()
        autojac_model.zero_grad()
