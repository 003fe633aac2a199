"""Our weightings and aggregators compose with torchjd's bases, grouping, hooks and engine."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close
from torchjd.aggregation import GramianWeightedAggregator, UPGrad, WeightedAggregator
from torchjd.autogram import Engine
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from torchjd_golden import GABA, GoldenPendulum, weighting_from_config
from torchjd_golden.aggregation._aggregator_bases import GramianAggregator
from torchjd_golden.aggregation._gramian import compute_gramian
from torchjd_golden.aggregation._torchjd_compat import torchjd_compute_gramian

from .._inputs import conflicting_jacobian
from .._methods import AGGREGATORS, WEIGHTINGS, Method, weighting_of

WEIGHTED_SUMS = [method for method in AGGREGATORS if method.weighted_sum]


def _torchjd_base_around_our_weighting(method: Method) -> nn.Module:
    """torchjd's own base class around the weighting of a fresh instance of ``method``."""

    aggregator = method.make()
    if isinstance(aggregator, GramianWeightedAggregator):
        return GramianWeightedAggregator(aggregator.gramian_weighting)
    return WeightedAggregator(weighting_of(aggregator))


@pytest.mark.parametrize("method", WEIGHTED_SUMS, ids=str)
def test_our_weightings_inside_torchjds_aggregator_bases(method: Method) -> None:
    ours, composed = method.make(), _torchjd_base_around_our_weighting(method)
    for seed in range(4):
        jacobian = conflicting_jacobian(4, 30, seed=seed, decades=2.0, dtype=torch.float32)
        method.extra_inputs(ours, jacobian)
        method.extra_inputs(weighting_of(composed), jacobian)
        assert_close(composed(jacobian), ours(jacobian), rtol=1e-5, atol=1e-7)


def test_grouping_mixes_our_aggregators_with_upgrad() -> None:
    """
    torchjd's grouping pattern (one jac_to_grad per group): Golden Pendulum on the encoder,
    UPGrad on the decoder, a stateful GABA per decoder layer. Each group's gradient is its own
    aggregation of its own Jacobian.
    """

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(10, 6), nn.ReLU())
    decoder = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU())
    heads = [nn.Linear(4, 1) for _ in range(3)]
    x, targets = torch.randn(16, 10), torch.randn(16, 3)
    layers = [m for m in decoder if isinstance(m, nn.Linear)]
    per_layer = [GABA(warmup_steps=0) for _ in layers]

    def losses() -> list[Tensor]:
        features = decoder(encoder(x))
        return [
            ((h(features)[:, 0] - t) ** 2).mean() for h, t in zip(heads, targets.T, strict=True)
        ]

    def jacobian(parameters: list[nn.Parameter]) -> Tensor:
        rows = [torch.autograd.grad(loss, parameters, retain_graph=True) for loss in losses()]
        return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])

    expected_encoder = GoldenPendulum()(jacobian(list(encoder.parameters())))
    expected_layers = [GABA(warmup_steps=0)(jacobian(list(layer.parameters()))) for layer in layers]
    expected_decoder = UPGrad()(jacobian(list(decoder.parameters())))

    features = decoder(encoder(x))
    mtl_backward(
        [((h(features)[:, 0] - t) ** 2).mean() for h, t in zip(heads, targets.T, strict=True)],
        features=features,
    )
    jac_to_grad(encoder.parameters(), GoldenPendulum())
    for layer, aggregator in zip(layers, per_layer, strict=True):
        jac_to_grad(layer.parameters(), aggregator, retain_jac=True)
    layer_gradients = [
        torch.cat([p.grad.flatten() for p in layer.parameters()]) for layer in layers
    ]  # type: ignore[union-attr]
    decoder.zero_grad()
    jac_to_grad(decoder.parameters(), UPGrad())

    assert_close(torch.cat([p.grad.flatten() for p in encoder.parameters()]), expected_encoder)  # type: ignore[union-attr]
    assert_close(
        torch.cat([p.grad.flatten() for p in decoder.parameters()]),
        expected_decoder,
        rtol=1e-4,
        atol=1e-6,
    )  # type: ignore[union-attr]
    for got, want in zip(layer_gradients, expected_layers, strict=True):
        assert_close(got, want)
    assert all(int(a.gramian_weighting.step_count) == 1 for a in per_layer)  # separate states


@pytest.mark.parametrize("method", WEIGHTED_SUMS, ids=str)
def test_forward_hooks_on_the_aggregator_and_its_weighting(method: Method) -> None:
    aggregator = method.make()
    inner = weighting_of(aggregator)
    seen: dict[str, Tensor] = {}
    aggregator.register_forward_hook(lambda _m, _i, output: seen.__setitem__("aggregation", output))
    inner.register_forward_hook(lambda _m, _i, weights: seen.__setitem__("weights", weights))
    # A hook may change what flows on: zero the first task's weight.
    inner.register_forward_hook(lambda _m, _i, weights: weights * torch.tensor([0.0, 1.0, 1.0]))

    jacobian = conflicting_jacobian(3, 20, seed=1, decades=1.0, dtype=torch.float32)
    method.extra_inputs(aggregator, jacobian)
    output = aggregator(jacobian)

    assert torch.equal(seen["aggregation"], output)
    assert_close(output, (seen["weights"] * torch.tensor([0.0, 1.0, 1.0])) @ jacobian)


@pytest.mark.parametrize(
    "spec",
    ["golden_pendulum", "gaba", {"name": "adaptive_golden_pendulum", "loss_ratio_aware": False}],
)
def test_every_gramian_weighting_with_the_engine(spec: object) -> None:
    """A weighting picked from a config, on the engine's Gramian, gives autojac's update."""

    torch.manual_seed(2)
    engine_model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    autojac_model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    autojac_model.load_state_dict(engine_model.state_dict())
    engine = Engine(engine_model, batch_dim=None)
    weighting = weighting_from_config(spec)
    aggregator = GramianWeightedAggregator(weighting_from_config(spec))
    x, y = torch.randn(16, 5), torch.randn(16, 3)

    losses = ((engine_model(x) - y) ** 2).mean(dim=0)
    losses.backward(weighting(engine.compute_gramian(losses)))
    backward(((autojac_model(x) - y) ** 2).mean(dim=0))
    jac_to_grad(autojac_model.parameters(), aggregator)

    for p, q in zip(engine_model.parameters(), autojac_model.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


JACOBIAN_WEIGHTINGS = [method for method in WEIGHTINGS if method.takes == "jacobian"]


@pytest.mark.parametrize("method", JACOBIAN_WEIGHTINGS, ids=str)
def test_a_weighting_of_the_jacobian_refuses_the_gramian_paths(method: Method) -> None:
    """
    torchjd's and this package's Gramian aggregators compose their weighting with a Gramian
    function: a weighting of the Jacobian refuses it (and with it
    ``optimize_gramian_computation=True``), naming the aggregator to use instead.
    """

    weighting = method.make()
    name = type(weighting).__name__
    message = (
        f"`{name}` weights the Jacobian itself .* Use `{name.removesuffix('Weighting')}\\(\\)`"
    )
    with pytest.raises(TypeError, match=message):
        GramianWeightedAggregator(weighting)
    with pytest.raises(TypeError, match=message):
        GramianAggregator(weighting)
    with pytest.raises(TypeError, match=message):
        weighting << torchjd_compute_gramian
    with pytest.raises(TypeError, match=message):
        weighting << compute_gramian


@pytest.mark.parametrize("method", JACOBIAN_WEIGHTINGS, ids=str)
def test_a_weighting_of_the_jacobian_takes_a_square_input_as_a_jacobian(method: Method) -> None:
    """
    A direct call (the autogram Engine's Gramian, say) cannot be told from a square Jacobian,
    which is legitimate: it is weighted as the Jacobian of m parameters, the same as with more
    parameters that are all zero. Other compositions still work.
    """

    square = conflicting_jacobian(3, 3, seed=4, decades=1.0)
    padded = torch.cat([square, torch.zeros(3, 5, dtype=square.dtype)], dim=1)
    assert_close(method.make()(square), method.make()(padded))
    assert_close((method.make() << torch.neg)(square), method.make()(-square))
