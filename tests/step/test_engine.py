"""
The step engine, :class:`~torchjd_golden.JacobianDescent`: on one process it is torchjd's
``mtl_backward``/``backward`` and ``jac_to_grad`` (or, from the features, the weights of the
feature Gramian applied by one backward pass); on two gloo processes under DDP and FSDP2 it
gives what one process gives on the whole batch, for every method and both sources.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import Tensor
from torchjd.aggregation import Constant, Mean, UPGrad
from torchjd.aggregation import ExcessMTL as TorchjdExcessMTL
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from torchjd_golden import ExcessMTL, GCond, GoldenPendulum, with_grad_scaler
from torchjd_golden.step import GramianSource, JacobianDescent
from torchjd_golden.step._sharded import column_split

from .._asserts import relative_error
from .._methods import NamedMean
from .._spawn import on_ranks
from .._step import (
    FACTORIES,
    TASKS,
    Network,
    Run,
    batch,
    flat,
    resumed,
    takes_gramian,
    train,
    wrapped,
)

GRAMIAN_FACTORIES = [name for name in FACTORIES if takes_gramian(name)]


def _tolerance(dtype: torch.dtype) -> float:
    """The issue's exactness targets: 1e-12 relative in float64, 1e-5 in float32."""

    return 1e-12 if dtype == torch.float64 else 1e-5


# -- one process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_task", [None, True], ids=["batched", "per task"])
@pytest.mark.parametrize("shared", ["trunk", "everything"])
@pytest.mark.parametrize("name", FACTORIES)
def test_one_process_is_torchjd(name: str, shared: str, per_task: bool | None) -> None:
    """``backward`` + ``jac_to_grad`` (all shared) or ``mtl_backward`` + ``jac_to_grad``."""

    torch.manual_seed(0)
    network = Network().double()
    twin = copy.deepcopy(network)
    aggregator, twin_aggregator = FACTORIES[name](), FACTORIES[name]()
    engine = JacobianDescent(
        network,
        aggregator,
        shared=network.trunk if shared == "trunk" else None,
        per_task=per_task,
    )
    for step in range(3):
        inputs, targets = batch(step)
        features, losses = network(inputs, targets)
        weights = engine.backward(dict(zip(TASKS, losses.unbind(), strict=True)), features=features)

        twin_features, twin_losses = twin(inputs, targets)
        _give_losses(twin_aggregator, twin_losses)
        if shared == "trunk":
            mtl_backward(list(twin_losses.unbind()), features=twin_features, retain_graph=True)
            twin_weights = jac_to_grad(list(twin.trunk.parameters()), twin_aggregator)
        else:
            backward(twin_losses)
            twin_weights = jac_to_grad(list(twin.parameters()), twin_aggregator)
        assert (weights is None) == (twin_weights is None)
        if weights is not None:
            assert relative_error(weights, twin_weights) <= 1e-14
        mine = flat([p.grad for p in network.parameters()])  # type: ignore[misc]
        theirs = flat([p.grad for p in twin.parameters()])  # type: ignore[misc]
        assert relative_error(mine, theirs) <= 1e-14
        network.zero_grad()
        twin.zero_grad()


def _give_losses(aggregator: Any, losses: Tensor) -> None:
    if hasattr(type(aggregator), "losses"):
        aggregator.losses = losses.detach()
    if hasattr(type(aggregator), "tasks"):
        aggregator.tasks = TASKS


@pytest.mark.parametrize("stacked", [True, False], ids=["one vector of losses", "a loss per head"])
def test_feature_gradients_in_one_vectorised_pass_are_those_of_a_pass_per_loss(
    stacked: bool,
) -> None:
    """
    Losses that share the graph above the features (one stacked vector) get their gradients in
    one vectorised pass, the others one pass per loss: the rows are the same either way.
    """

    from torchjd_golden.step._features import feature_gradients  # noqa: PLC0415
    from torchjd_golden.step._jacobian import share_graph_above  # noqa: PLC0415

    network = Network().double()
    inputs, targets = batch(0)
    features, stacked_losses = network(inputs, targets)
    losses = list(stacked_losses.unbind())
    if not stacked:
        losses = [
            (head(features)[:, 0] - targets[:, k]).pow(2).mean()
            for k, head in enumerate(network.heads)
        ]
    assert share_graph_above(losses, [features]) == stacked
    batched = feature_gradients(losses, [features], batched=True)
    one_by_one = feature_gradients(losses, [features], batched=False)
    assert batched.shape == (len(TASKS), features.numel())
    assert relative_error(batched, one_by_one) <= 16 * torch.finfo(torch.float64).eps


@pytest.mark.parametrize("name", GRAMIAN_FACTORIES)
def test_features_weights_are_those_of_the_feature_gramian(name: str) -> None:
    r"""
    The weights are the weighting's on :math:`G_{ij} = \langle \partial L_i / \partial z,
    \partial L_j / \partial z \rangle`, and the gradients are ``mtl_backward`` aggregated by
    those weights (:math:`w^\top J` on the trunk, each head its own loss's gradient).
    """

    torch.manual_seed(0)
    network = Network().double()
    twin = copy.deepcopy(network)
    aggregator, twin_aggregator = FACTORIES[name](), FACTORIES[name]()
    engine = JacobianDescent(network, aggregator, shared=network.trunk, gramian_from="features")
    for step in range(3):
        inputs, targets = batch(step)
        features, losses = network(inputs, targets)
        weights = engine.backward(dict(zip(TASKS, losses.unbind(), strict=True)), features=features)

        twin_features, twin_losses = twin(inputs, targets)
        rows = torch.stack(
            [
                torch.autograd.grad(loss, twin_features, retain_graph=True)[0].reshape(-1)
                for loss in twin_losses
            ]
        )
        _give_losses(twin_aggregator, twin_losses)
        expected = twin_aggregator.gramian_weighting(rows @ rows.T)
        assert weights is not None
        assert relative_error(weights, expected) <= 1e-13
        mtl_backward(list(twin_losses.unbind()), features=twin_features, retain_graph=True)
        jac_to_grad(list(twin.trunk.parameters()), Constant(expected))
        mine = flat([p.grad for p in network.parameters()])  # type: ignore[misc]
        theirs = flat([p.grad for p in twin.parameters()])  # type: ignore[misc]
        assert relative_error(mine, theirs) <= 1e-13
        network.zero_grad()
        twin.zero_grad()


# -- two processes --------------------------------------------------------------------------------

_CASES = [
    *[(name, "parameters", torch.float64) for name in FACTORIES],
    *[(name, "features", torch.float64) for name in GRAMIAN_FACTORIES],
    *[
        (name, source, torch.float32)
        for name in ("GoldenPendulum", "GABA", "ExcessMTL", "GCond", "torchjd UPGrad")
        for source in ("parameters", "features")
        if source == "parameters" or takes_gramian(name)
    ],
]


def _case_id(case: tuple[str, GramianSource, torch.dtype]) -> str:
    name, source, dtype = case
    return f"{name}-{source}-{str(dtype).removeprefix('torch.')}"


_SPLIT_STATE = ("ExcessMTL", "GCond")  # state kept per rank, for the rank's columns


def _train_cases(layout: str, rank: int) -> dict[str, Any]:
    runs: dict[str, Any] = {
        _case_id(case): train(case[0], case[1], layout=layout, rank=rank, dtype=case[2])  # type: ignore[arg-type]
        for case in _CASES
    }
    for name in _SPLIT_STATE:
        runs[f"resumed {name}"] = resumed(name, layout=layout, rank=rank)  # type: ignore[arg-type]
    return runs


def _every_layout(rank: int) -> dict[str, Any]:
    """Every case under DDP, then under FSDP2: one start of the two processes for all checks."""

    runs: dict[str, Any] = {layout: _train_cases(layout, rank) for layout in ("ddp", "fsdp")}
    for name in _FOUND:  # the trainers' step: the trunk found from the features
        runs[f"found {name}"] = train(
            name, "parameters", layout="ddp", rank=rank, shared="features"
        )
    try:  # the trainers' shared parameters, found in the graph, are FSDP2's unsharded ones
        JacobianDescent(wrapped(Network(), "fsdp"), UPGrad(), shared="features")
    except ValueError as error:
        runs["fsdp refusal"] = str(error)
    return runs


@pytest.fixture(scope="module")
def two_process_runs() -> list[dict[str, Any]]:
    return on_ranks(_every_layout)


@pytest.fixture(scope="module")
def ddp_runs(two_process_runs: list[dict[str, Any]]) -> list[dict[str, Run]]:
    return [runs["ddp"] for runs in two_process_runs]


@pytest.fixture(scope="module")
def fsdp_runs(two_process_runs: list[dict[str, Any]]) -> list[dict[str, Run]]:
    return [runs["fsdp"] for runs in two_process_runs]


@functools.cache
def _one_process(name: str, source: GramianSource, dtype: torch.dtype) -> Run:
    """The reference of both layouts: one process on the whole batches (computed once)."""

    return train(name, source, dtype=dtype)


_FOUND = ("GoldenPendulum", "GCond")


@pytest.mark.parametrize("name", _FOUND)
def test_ddp_with_the_shared_parameters_found_is_one_process(
    name: str, two_process_runs: list[dict[str, Any]]
) -> None:
    first, second = (runs[f"found {name}"] for runs in two_process_runs)
    alone = _one_process(name, "parameters", torch.float64)
    for mine, other in zip(first.parameters, second.parameters, strict=True):
        assert torch.equal(mine, other)
    for mine, expected in zip(first.weights, alone.weights, strict=True):
        assert (mine is None) == (expected is None)
        if mine is not None:
            assert relative_error(mine, expected) <= _tolerance(torch.float64)  # type: ignore[arg-type]
    for mine, expected in zip(first.gradients, alone.gradients, strict=True):
        assert relative_error(mine, expected) <= _tolerance(torch.float64)


def test_fsdp2_needs_the_shared_parameters_named(two_process_runs: list[dict[str, Any]]) -> None:
    for runs in two_process_runs:
        assert "FSDP2 needs the shared parameters named" in runs.get("fsdp refusal", "")


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_two_processes_train_like_one_on_the_whole_batch(
    case: tuple[str, GramianSource, torch.dtype], layout: str, request: pytest.FixtureRequest
) -> None:
    name, source, dtype = case
    runs: list[dict[str, Run]] = request.getfixturevalue(f"{layout}_runs")
    first, second = (runs[rank][_case_id(case)] for rank in range(2))
    for mine, other in zip(first.weights, second.weights, strict=True):  # the same on every rank
        assert (mine is None and other is None) or torch.equal(mine, other)  # type: ignore[arg-type]
    for mine, other in zip(first.parameters, second.parameters, strict=True):
        assert torch.equal(mine, other)

    alone = _one_process(name, source, dtype)
    tolerance = _tolerance(dtype)
    for mine, expected in zip(first.weights, alone.weights, strict=True):
        assert (mine is None) == (expected is None)
        if mine is not None:
            assert relative_error(mine, expected) <= tolerance  # type: ignore[arg-type]
    for mine, expected in zip(first.gradients, alone.gradients, strict=True):
        assert relative_error(mine, expected) <= tolerance
    # A monitor hooked on the weighting records the whole batch's Gramian, as one process does.
    for mine_norms, expected_norms in zip(first.norms, alone.norms, strict=True):
        assert mine_norms == pytest.approx(expected_norms, rel=tolerance)


# -- graphs that torch.vmap cannot go through -----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "compiled_as"),
    [("parameters", "a whole"), ("parameters", "parts"), ("features", "parts")],
)
def test_a_compiled_model_trains_as_the_eager_one(source: GramianSource, compiled_as: str) -> None:
    """
    torchjd's batched backward fails on a compiled backward; the engine runs one pass per task.
    The features are an intermediate of the losses' graph only between compiled parts.
    """

    torch.manual_seed(0)
    network = Network().double()
    twin = copy.deepcopy(network)
    model: torch.nn.Module = network
    if compiled_as == "a whole":
        model = torch.compile(network, backend="aot_eager")  # type: ignore[assignment]
    else:
        for part in (network.trunk, *network.heads):
            part.compile(backend="aot_eager")
    engine = JacobianDescent(model, UPGrad(), shared=network.trunk, gramian_from=source)
    eager = JacobianDescent(twin, UPGrad(), shared=twin.trunk, gramian_from=source)
    assert engine.per_task
    assert not eager.per_task
    for step in range(2):
        inputs, targets = batch(step)
        features, losses = model(inputs, targets)
        weights = engine.backward(losses, features=features)
        twin_features, twin_losses = twin(inputs, targets)
        expected = eager.backward(twin_losses, features=twin_features)
        assert relative_error(weights, expected) <= 1e-12  # type: ignore[arg-type]
        mine = flat([p.grad for p in network.parameters()])  # type: ignore[misc]
        theirs = flat([p.grad for p in twin.parameters()])  # type: ignore[misc]
        assert relative_error(mine, theirs) <= 1e-12
        network.zero_grad()
        twin.zero_grad()


def test_features_outside_the_losses_graph_are_refused() -> None:
    """A model compiled as a whole: its returned features are not on the losses' path."""

    network = Network().double()
    compiled = torch.compile(network, backend="aot_eager")
    engine = JacobianDescent(compiled, UPGrad(), shared=network.trunk, gramian_from="features")
    features, losses = compiled(*batch(0))
    with pytest.raises(ValueError, match="compile the trunk and the heads separately"):
        engine.backward(losses, features=features)


@pytest.mark.parametrize("source", ["parameters", "features"])
def test_activation_checkpointing_with_dropout(source: GramianSource) -> None:
    """
    Dropout replayed by activation checkpointing is a random operation vmap refuses: the first
    batched pass fails, the engine turns to one pass per task, and the gradients are those of the
    same model without checkpointing (the replay draws the same masks).
    """

    torch.manual_seed(0)
    network = Network(dropout=0.3, checkpointed=True).double()
    twin = copy.deepcopy(network)
    twin.checkpointed = False
    engine = JacobianDescent(network, UPGrad(), shared=network.trunk, gramian_from=source)
    plain = JacobianDescent(twin, UPGrad(), shared=twin.trunk, gramian_from=source)
    for step in range(2):
        inputs, targets = batch(step)
        with torch.random.fork_rng():
            features, losses = network(inputs, targets)
        twin_features, twin_losses = twin(inputs, targets)  # the same dropout masks
        weights = engine.backward(losses, features=features)
        expected = plain.backward(twin_losses, features=twin_features)
        assert relative_error(weights, expected) <= 1e-14  # type: ignore[arg-type]
        mine = flat([p.grad for p in network.parameters()])  # type: ignore[misc]
        theirs = flat([p.grad for p in twin.parameters()])  # type: ignore[misc]
        assert relative_error(mine, theirs) <= 1e-14
        network.zero_grad()
        twin.zero_grad()
    if source == "parameters":  # the features' passes are per task anyway
        assert engine.per_task is True


# -- micro-batches, loss scaling, task names ------------------------------------------------------


@pytest.mark.parametrize("name", ["GCond", "GoldenPendulum", "ExcessMTL"])
def test_micro_batches_accumulate_then_resolve(name: str) -> None:
    """Two ``accumulate`` and one ``resolve``: torchjd's accumulated ``.jac``, one aggregation."""

    torch.manual_seed(0)
    network = Network().double()
    twin = copy.deepcopy(network)
    aggregator, twin_aggregator = FACTORIES[name](), FACTORIES[name]()
    engine = JacobianDescent(network, aggregator, shared=network.trunk)
    for step in range(2):
        for micro_batch in range(2):
            inputs, targets = batch(10 * step + micro_batch)
            features, losses = network(inputs, targets)
            engine.accumulate(losses / 2, features=features)
            twin_features, twin_losses = twin(inputs, targets)
            mtl_backward(
                list((twin_losses / 2).unbind()), features=twin_features, retain_graph=True
            )
        weights = engine.resolve()
        expected = jac_to_grad(list(twin.trunk.parameters()), twin_aggregator)
        assert (weights is None) == (expected is None)
        if weights is not None:
            assert relative_error(weights, expected) <= 1e-14
        mine = flat([p.grad for p in network.parameters()])  # type: ignore[misc]
        theirs = flat([p.grad for p in twin.parameters()])  # type: ignore[misc]
        assert relative_error(mine, theirs) <= 1e-14
        network.zero_grad()
        twin.zero_grad()


def test_features_micro_batches_are_weighted_one_by_one() -> None:
    """With ``"features"`` each micro-batch is weighted as it comes; resolve gives the mean."""

    torch.manual_seed(0)
    network = Network().double()
    twin = copy.deepcopy(network)
    engine = JacobianDescent(network, UPGrad(), shared=network.trunk, gramian_from="features")
    single = JacobianDescent(twin, UPGrad(), shared=twin.trunk, gramian_from="features")
    expected = []
    for micro_batch in range(2):
        inputs, targets = batch(micro_batch)
        features, losses = network(inputs, targets)
        engine.accumulate(losses, features=features)
        twin_features, twin_losses = twin(inputs, targets)
        expected.append(single.backward(twin_losses, features=twin_features))  # grads add up
    weights = engine.resolve()
    assert relative_error(weights, (expected[0] + expected[1]) / 2) <= 1e-15  # type: ignore[operator, arg-type]
    mine = flat([p.grad for p in network.parameters()])  # type: ignore[misc]
    theirs = flat([p.grad for p in twin.parameters()])  # type: ignore[misc]
    assert relative_error(mine, theirs) <= 1e-15


@pytest.mark.parametrize("source", ["parameters", "features"])
@pytest.mark.parametrize("name", ["GoldenPendulum", "GABA", "AdaptiveGoldenPendulum"])
def test_a_grad_scaler_sees_the_unscaled_step(name: str, source: GramianSource) -> None:
    """
    Scaled losses: the gradients are ``s`` times those of the unscaled step (so ``scaler.step``
    applies the unscaled one), the weights and the state are the unscaled step's; an overflow
    leaves the state untouched and gives non-finite gradients, which the scaler skips.
    """

    torch.manual_seed(0)
    network = Network().double()
    twin = copy.deepcopy(network)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    aggregator, twin_aggregator = FACTORIES[name](), FACTORIES[name]()
    engine = JacobianDescent(
        network, aggregator, shared=network.trunk, gramian_from=source, scaler=scaler
    )
    plain = JacobianDescent(twin, twin_aggregator, shared=twin.trunk, gramian_from=source)
    for step in range(3):
        inputs, targets = batch(step)
        features, losses = network(inputs, targets)
        weights = engine.backward(scaler.scale(losses), features=features)
        twin_features, twin_losses = twin(inputs, targets)
        expected = plain.backward(twin_losses, features=twin_features)
        assert relative_error(weights, expected) <= 1e-12  # type: ignore[arg-type]
        mine = flat([p.grad for p in network.parameters()])  # type: ignore[misc]
        theirs = flat([p.grad for p in twin.parameters()])  # type: ignore[misc]
        assert relative_error(mine / 2.0**12, theirs) <= 1e-12
        network.zero_grad()
        twin.zero_grad()
    before = {k: v.clone() for k, v in aggregator.state_dict().items()}
    inputs, targets = batch(3)
    features, losses = network(inputs, targets)
    engine.backward(
        scaler.scale(losses * torch.tensor([1.0, float("inf"), 1.0])), features=features
    )
    assert not all(bool(p.grad.isfinite().all()) for p in network.trunk.parameters())  # type: ignore[union-attr]
    for key, value in aggregator.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_aggregator_is_told_the_task_names() -> None:
    network = Network().double()
    aggregator = NamedMean()
    engine = JacobianDescent(network, aggregator, shared=network.trunk)
    features, losses = network(*batch(0))
    engine.backward(dict(zip(TASKS, losses.unbind(), strict=True)), features=features)
    features, losses = network(*batch(1))
    engine.backward(losses, features=features)  # a vector: the tasks are known by position
    assert aggregator.seen == [TASKS, None]


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_message() -> None:
    network = Network().double()
    with pytest.raises(TypeError, match="torchjd Aggregator"):
        JacobianDescent(network, "upgrad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gramian_from"):
        JacobianDescent(network, UPGrad(), gramian_from="gradients")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights the Jacobian itself"):
        JacobianDescent(network, ExcessMTL(), gramian_from="features")
    with pytest.raises(ValueError, match="not a parameter of `module`"):
        JacobianDescent(network, UPGrad(), shared=[torch.zeros(2, requires_grad=True)])
    engine = JacobianDescent(network, UPGrad(), gramian_from="features")
    features, losses = network(*batch(0))
    with pytest.raises(ValueError, match="needs the shared features"):
        engine.backward(losses)
    with pytest.raises(ValueError, match="vector of losses"):
        engine.backward(losses.reshape(1, -1), features=features)
    with pytest.raises(ValueError, match="does not require grad"):
        engine.backward(losses.detach(), features=features)
    with pytest.raises(RuntimeError, match="call `accumulate` first"):
        engine.resolve()
    exact = JacobianDescent(network, UPGrad())
    exact.accumulate(dict(zip(TASKS, losses.unbind(), strict=True)), features=features)
    _, other_losses = network(*batch(1))
    with pytest.raises(ValueError, match="tasks changed within one step"):
        exact.accumulate(dict(zip(("a", "b", "c"), other_losses.unbind(), strict=True)))


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", _SPLIT_STATE)
def test_a_split_state_is_per_rank_and_resumes_identically(
    name: str, layout: str, request: pytest.FixtureRequest
) -> None:
    """
    ExcessMTL's squared-gradient sums and GCond's previous rows and momentum cover this rank's
    columns only (about half of the trunk's on each of two ranks), and a run resumed from each
    rank's own checkpoint continues bit-identically.
    """

    runs: list[dict[str, Any]] = request.getfixturevalue(f"{layout}_runs")
    n = sum(p.numel() for p in Network().trunk.parameters())
    widths = []
    for rank in range(2):
        uninterrupted, restarted = runs[rank][f"resumed {name}"]
        for mine, expected in zip(restarted.gradients, uninterrupted.gradients, strict=True):
            assert torch.equal(mine, expected)
        for key, value in uninterrupted.state.items():
            assert torch.equal(restarted.state[key], value), key
        per_column = "sq_grad_sum" if name == "ExcessMTL" else "momentum"
        state = uninterrupted.state[next(k for k in uninterrupted.state if k.endswith(per_column))]
        widths.append(state.shape[-1])
    assert sum(widths) >= n  # blocks, not the whole row
    assert max(widths) <= -(-n // 2) + 1


def test_how_each_aggregator_splits_over_the_ranks() -> None:
    """Gramian weightings by their Gramian, ExcessMTL and GCond by blocks, the others whole."""

    scaler = torch.amp.GradScaler("cpu")
    assert column_split(GoldenPendulum()) == "gramian"
    assert column_split(UPGrad()) == "gramian"
    assert column_split(with_grad_scaler(GoldenPendulum(), scaler)) == "gramian"
    for blocks in (ExcessMTL(), GCond(), GCond(momentum_beta=0.0)):
        assert column_split(blocks) == "blocks"
        assert column_split(with_grad_scaler(blocks, scaler)) == "blocks"
    assert column_split(Mean()) == "whole"
    assert column_split(TorchjdExcessMTL()) == "whole"  # its sums are not reduced over blocks
    compiled = ExcessMTL()
    compiled.compile(backend="eager")  # cannot read which block it runs on
    assert column_split(compiled) == "whole"
