"""
The comparison's training step runs through the step engine: ``"parameters"`` is the step it
replaced (torchjd's ``mtl_backward`` and ``jac_to_grad``), ``"features"`` takes the weights from
the feature Gramian, and both report the weights applied and each task's share of the update.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchjd.autojac import jac_to_grad, mtl_backward

from torchjd_golden.compare._methods import build_method, weights_the_gramian
from torchjd_golden.compare._training import (
    Job,
    MultiTaskNetwork,
    _adam,
    _batches,
    _evaluate,
    _train_method,
    applied_weights,
    load_workload,
    run_job,
    update_shares,
)
from torchjd_golden.compare._workloads import Workload

STEPS = 12
# float32 rounding over a dozen Adam steps of a 64-wide network, summed over the m rows.
TOLERANCE = 64 * 4 * torch.finfo(torch.float32).eps


def _previous_step(workload: Workload, job: Job) -> dict[str, Tensor | dict[str, float] | None]:
    """
    The comparison's training loop before the engine, kept here as the reference: torchjd's
    ``mtl_backward`` on the features, ``jac_to_grad`` on the trunk, the aggregator's task names
    set once and its losses (where it reads them) set at each step.
    """

    assert job.method is not None
    method = build_method(job.method, workload, job.steps)
    torch.manual_seed(job.seed)
    network = MultiTaskNetwork(workload.train_inputs.shape[1], workload.tasks)
    aggregator = method.aggregator
    if hasattr(type(aggregator), "tasks"):
        aggregator.tasks = [task.name for task in workload.tasks]  # type: ignore[assignment]
    optimizer = _adam(network, method.settings.adam_betas)
    norms: list[Tensor] = []
    aggregator.register_forward_pre_hook(
        lambda _module, inputs: norms.append(torch.linalg.vector_norm(inputs[0].detach(), dim=1))
    )
    losses_per_step, weights_per_step, alphas = [], [], []
    for batch in _batches(workload, job, torch.device("cpu")):
        features, outputs = network(workload.train_inputs[batch])
        targets = workload.train_targets[batch].T
        losses = [
            task.loss(output, target)
            for task, output, target in zip(workload.tasks, outputs, targets, strict=True)
        ]
        if hasattr(aggregator, "losses"):
            aggregator.losses = torch.stack(losses).detach()
        mtl_backward(losses, features=features)
        returned = jac_to_grad(network.trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
        losses_per_step.append(torch.stack(losses).detach())
        weights_per_step.append(applied_weights(aggregator, returned).detach().clone())
        alpha = getattr(aggregator, "alpha", None)
        if isinstance(alpha, Tensor):
            alphas.append(alpha.detach().clone())
    weights = torch.stack(weights_per_step)
    return {
        "losses": torch.stack(losses_per_step),
        "weights": weights / weights.abs().sum(dim=1, keepdim=True),
        "shares": update_shares(weights, torch.stack(norms)),
        "alphas": torch.stack(alphas) if alphas else None,
        "metrics": _evaluate(
            network, workload, workload.tasks, range(len(workload.tasks)), torch.device("cpu")
        ),
    }


@pytest.mark.parametrize(
    ("workload_name", "method"),
    [
        ("synthetic", "golden_pendulum"),
        ("synthetic", "gcond"),  # its weights are its resolution's, the step returns none
        ("synthetic", "excess_mtl"),  # per-task state keyed by the tasks' names
        ("synthetic", "adaptive_golden_pendulum"),  # reads the losses
        ("digits", "upgrad"),
        ("digits", "mean"),
    ],
)
def test_the_engines_parameters_step_is_the_previous_step(workload_name: str, method: str) -> None:
    workload = load_workload(workload_name, 0)
    job = Job(workload_name, 0, STEPS, method=method)
    expected = _previous_step(workload, job)
    run = run_job(job)
    for name in ("losses", "weights", "shares", "alphas"):
        torch.testing.assert_close(
            getattr(run, name), expected[name], rtol=TOLERANCE, atol=TOLERANCE, msg=name
        )
    metrics = expected["metrics"]
    assert isinstance(metrics, dict)
    assert run.metrics == pytest.approx(metrics, abs=TOLERANCE)


@pytest.mark.parametrize("method", ["golden_pendulum", "upgrad", "gaba"])
def test_the_features_step_weights_the_feature_gramian(method: str) -> None:
    """
    The first step's weights are those the method gives the Gramian of the tasks' gradients with
    respect to the trunk's output, and its shares come from that Gramian's diagonal.
    """

    workload = load_workload("synthetic", 0)
    job = Job("synthetic", 0, 2, method=method, gramian_from="features")
    run = run_job(job)
    assert run.weights is not None
    assert run.shares is not None

    torch.manual_seed(job.seed)  # the run's initialisation and first batch, rebuilt
    network = MultiTaskNetwork(workload.train_inputs.shape[1], workload.tasks)
    batch = _batches(workload, job, torch.device("cpu"))[0]
    features, outputs = network(workload.train_inputs[batch])
    rows = []
    for task, output, target in zip(
        workload.tasks, outputs, workload.train_targets[batch].T, strict=True
    ):
        (gradient,) = torch.autograd.grad(task.loss(output, target), features, retain_graph=True)
        rows.append(gradient.flatten())
    jacobian = torch.stack(rows)
    fresh = build_method(method, workload, job.steps).aggregator
    fresh.tasks = [task.name for task in workload.tasks]  # type: ignore[assignment]
    weights = fresh.gramian_weighting(jacobian @ jacobian.T)  # type: ignore[attr-defined]
    torch.testing.assert_close(
        run.weights[0], weights / weights.abs().sum(), rtol=TOLERANCE, atol=TOLERANCE
    )
    expected_shares = update_shares(weights, torch.linalg.vector_norm(jacobian, dim=1))
    torch.testing.assert_close(run.shares[0], expected_shares, rtol=TOLERANCE, atol=TOLERANCE)
    # The trunk's own Jacobian has other row norms: the shares are the features'.
    assert not torch.allclose(
        run.shares[0], run_job(Job("synthetic", 0, 2, method=method)).shares[0]
    )  # type: ignore[index]


def test_golden_pendulum_reports_its_alpha_in_both_modes() -> None:
    for mode in ("parameters", "features"):
        run = run_job(Job("synthetic", 0, 3, method="golden_pendulum", gramian_from=mode))
        assert run.alphas is not None
        torch.testing.assert_close(run.alphas.sum(dim=1), torch.ones(3))


def test_a_jacobian_weighting_has_no_features_step() -> None:
    workload = load_workload("synthetic", 0)
    for name in ("excess_mtl", "gcond", "mean"):
        assert not weights_the_gramian(build_method(name, workload, 10).aggregator)
        with pytest.raises(ValueError, match="weights the Jacobian itself"):
            build_method(name, workload, 10, gramian_from="features")
    method = build_method("upgrad", workload, 10, gramian_from="features")
    assert method.label == "UPGrad (features)"
    with pytest.raises(ValueError, match="gramian_from"):
        build_method("upgrad", workload, 10, gramian_from="feature")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="was built for 'features'"):
        _train_method(
            workload, Job("synthetic", 0, 2, method="upgrad"), method, torch.device("cpu")
        )


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"method": "upgrad", "gramian_from": "gradients"}, "gramian_from"),
        ({"task": 0, "gramian_from": "features"}, "no feature Gramian"),
    ],
)
def test_bad_jobs(keywords: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Job("synthetic", 0, 2, **keywords)  # type: ignore[arg-type]
