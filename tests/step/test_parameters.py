"""
The parameters a step updates: with ``shared="features"`` the engine finds the shared ones in each
step's graph as torchjd's ``mtl_backward`` finds them (the trainers' case: a model that gives its
features but does not name its trunk), and gives nothing to the parameters no loss reaches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from torchjd_golden.step import JacobianDescent
from torchjd_golden.step._parameters import graph_leaves

from .._step import FACTORIES, TASKS, Network, batch


class Unused(Network):
    """The test network with a parameter that no loss reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.ones(3))


@pytest.mark.parametrize("per_task", [None, True], ids=["batched", "per task"])
@pytest.mark.parametrize("with_features", [True, False], ids=["features", "no features"])
@pytest.mark.parametrize("name", ["GCond", "GoldenPendulum", "ExcessMTL", "torchjd UPGrad"])
def test_found_shared_parameters_are_torchjds_defaults(
    name: str, with_features: bool, per_task: bool | None
) -> None:
    """
    ``mtl_backward(losses, features=features)`` (or ``backward(losses)``) and ``jac_to_grad`` on
    the parameters it gave a Jacobian, bit for bit; the unused parameter gets no gradient.
    """

    torch.manual_seed(0)
    network = Unused().double()
    twin = copy.deepcopy(network)
    aggregator, twin_aggregator = FACTORIES[name](), FACTORIES[name]()
    engine = JacobianDescent(network, aggregator, shared="features", per_task=per_task)
    for step in range(3):
        inputs, targets = batch(step)
        features, losses = network(inputs, targets)
        named = dict(zip(TASKS, losses.unbind(), strict=True))
        weights = engine.backward(named, features=features if with_features else None)

        twin_features, twin_losses = twin(inputs, targets)
        if hasattr(type(twin_aggregator), "tasks"):
            twin_aggregator.tasks = TASKS  # type: ignore[attr-defined]
        if with_features:
            mtl_backward(list(twin_losses.unbind()), features=twin_features, retain_graph=True)
        else:
            backward(twin_losses)
        jacobians = [p for p in twin.parameters() if hasattr(p, "jac")]
        assert len(jacobians) == (4 if with_features else 10)  # the trunk's, or all but unused
        expected = jac_to_grad(jacobians, twin_aggregator)
        assert (weights is None) == (expected is None)
        if weights is not None:
            assert torch.equal(weights, expected)  # type: ignore[arg-type]
        assert network.unused.grad is None
        for (label, mine), theirs in zip(
            network.named_parameters(), twin.parameters(), strict=True
        ):
            assert (mine.grad is None) == (theirs.grad is None), label
            if mine.grad is not None:
                # Bit for bit batched; per task, the rows come from m ordinary backward passes.
                tolerance = 0.0 if per_task is None else 64 * torch.finfo(torch.float64).eps
                scale = float(theirs.grad.abs().max())  # type: ignore[union-attr]
                error = float((mine.grad - theirs.grad).abs().max())  # type: ignore[operator]
                assert error <= tolerance * scale, label
        network.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)


def test_a_head_whose_task_is_absent_gets_no_gradient() -> None:
    """Tasks may change from one step to the next: the absent task's head is left alone."""

    torch.manual_seed(0)
    network = Network().double()
    engine = JacobianDescent(network, UPGrad(), shared="features")
    inputs, targets = batch(0)
    features = network.trunk(inputs)
    losses = {
        task: (head(features)[:, 0] - targets[:, k]).pow(2).mean()
        for k, (task, head) in enumerate(zip(TASKS[:2], network.heads, strict=False))
    }
    engine.backward(losses, features=features)
    assert network.heads[2].weight.grad is None
    assert all(p.grad is not None for p in network.trunk.parameters())
    assert all(p.grad is not None for p in network.heads[0].parameters())


def test_the_leaves_of_a_graph_stop_at_the_features() -> None:
    torch.manual_seed(0)
    network = Network().double()
    features, losses = network(*batch(0))
    trunk = {id(p) for p in network.trunk.parameters()}
    heads = {id(p) for p in network.heads.parameters()}
    assert set(graph_leaves([features])) == trunk
    assert set(graph_leaves(list(losses.unbind()), stops=[features])) == heads
    assert set(graph_leaves([losses])) == trunk | heads
    leaf = torch.ones(2, requires_grad=True)
    assert list(graph_leaves([leaf])) == [id(leaf)]  # a leaf is its own


def test_a_shared_name_other_than_features_is_refused() -> None:
    network = Network()
    with pytest.raises(ValueError, match=r"`shared` must be .*'features' or None. Found 'trunk'"):
        JacobianDescent(network, UPGrad(), shared="trunk")  # type: ignore[arg-type]


def test_each_loss_is_differentiated_with_respect_to_its_own_head_only() -> None:
    """
    The exact step gives torchjd's ``mtl_backward`` each loss's own head (the parameters its
    graph reaches above the features), not every head: m^2 head gradients, most of them zeros,
    made the step 2.5x torchjd's at 40 tasks. A parameter no loss reaches goes to the first
    loss, which gives it zeros.
    """

    from torchjd_golden.step._jacobian import _heads  # noqa: PLC0415

    network = Unused().double()
    inputs, targets = batch(0)
    features = network.trunk(inputs)
    losses = [
        (head(features)[:, 0] - targets[:, k]).pow(2).mean() for k, head in enumerate(network.heads)
    ]
    others = [*network.heads.parameters(), network.unused]
    heads = _heads(losses, [features], others)
    own = [list(head.parameters()) for head in network.heads]
    assert [{id(p) for p in h} for h in heads[1:]] == [{id(p) for p in h} for h in own[1:]]
    assert {id(p) for p in heads[0]} == {id(p) for p in [*own[0], network.unused]}
