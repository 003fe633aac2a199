from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torchjd.aggregation import WeightedAggregator
from torchjd.autojac import backward, jac_to_grad

from torchjd_golden import (
    ConflictMonitor,
    Curriculum,
    GCond,
    GCondWeighting,
    Phase,
    WeightLogger,
    backward_task,
    with_grad_scaler,
)
from torchjd_golden.aggregation._kernels import solver_path
from torchjd_golden.compare._training import applied_weights
from torchjd_golden.step._task_step import JacobianStep

from .._asserts import relative_error
from .._inputs import conflicting_jacobian

VECTORS = json.loads((Path(__file__).parents[1] / "data" / "gcond_vectors.json").read_text())
SEQUENCES = VECTORS["sequences"]


def _from_config(config: dict[str, Any]) -> GCond:
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    assert arguments.pop("use_lion") is False
    return GCond(**arguments)


def _ordered_history(weighting: GCondWeighting) -> list[int]:
    """The winner history, oldest first, read out of the ring buffer."""

    window, count = weighting.dominance_window, int(weighting.winner_count)
    ring = weighting.winner_history.tolist()
    return [ring[k % window] for k in range(max(0, count - window), count)] if window else []


@pytest.mark.parametrize("sequence", SEQUENCES, ids=[s["name"] for s in SEQUENCES])
def test_matches_the_official_implementation(sequence: dict[str, Any], solver_path: str) -> None:
    aggregator = _from_config(sequence["config"])
    captured: list[Tensor] = []
    aggregator.weighting.register_forward_hook(lambda _m, _i, output: captured.append(output))

    for step in sequence["steps"]:
        jacobian = torch.tensor(step["jacobian"])
        update = aggregator(jacobian)
        resolved = captured[-1] @ jacobian

        assert relative_error(resolved, torch.tensor(step["resolved"])) < 1e-5
        assert relative_error(update, torch.tensor(step["update"])) < 1e-5
        weighting = aggregator.weighting
        assert_close(weighting.norm_ema, torch.tensor(step["norm_ema_after"], dtype=torch.float64))
        if step["discrete_robust"]:
            assert float(weighting.proj_iters) == step["proj_iters"]
            assert _ordered_history(weighting) == step["history_after"]
            assert abs(float(weighting.min_cosine_sim) - step["min_cosine_sim"]) < 1e-5


def test_without_momentum_the_update_is_the_resolved_gradient() -> None:
    aggregator = GCond(momentum_beta=0.0)
    weighting = GCondWeighting()
    for seed in range(3):
        jacobian = conflicting_jacobian(4, 30, seed=seed, decades=1.0, dtype=torch.float32)
        assert_close(aggregator(jacobian), weighting(jacobian) @ jacobian)
    assert aggregator.momentum.numel() == 0  # nothing stored


def test_momentum_is_bias_corrected() -> None:
    """Two steps by hand: m1 = (1-b) g1, m2 = b m1 + (1-b) g2, update_t = m_t / (1 - b^t)."""

    beta = 0.85
    aggregator, weighting = GCond(momentum_beta=beta), GCondWeighting()
    jacobians = [conflicting_jacobian(3, 20, seed=s, decades=1.0) for s in (1, 2)]
    resolved = [weighting(j) @ j for j in jacobians]
    first = (1 - beta) * resolved[0]
    second = beta * first + (1 - beta) * resolved[1]
    assert_close(aggregator(jacobians[0]), first / (1 - beta))
    assert_close(aggregator(jacobians[1]), second / (1 - beta**2))


def test_the_momentum_updated_in_place_on_the_host_equals_the_tensor_path() -> None:
    """
    On the host path the momentum is updated in place and a bad step skips it; on the tensor
    path it is recomputed and committed. Both give the same bits through a non-finite step, a
    restart for a new task count and a change of precision, and the same final_grad_norm.
    """

    def jacobian(m: int, seed: int) -> Tensor:
        return conflicting_jacobian(m, 40, seed=seed, decades=2.0, dtype=torch.float32)

    jacobians = [jacobian(4, s) for s in range(3)] + [torch.full((4, 40), torch.nan)]
    jacobians += [jacobian(4, 3), jacobian(3, 4), jacobian(3, 5)]
    jacobians += [jacobians[-1].double(), jacobians[-1].half()]
    results = {}
    for path in ("host", "tensor"):
        aggregator, outputs = GCond(), []
        with solver_path(path), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for jacobian in jacobians:
                update = aggregator(jacobian)
                outputs.append((update, aggregator.stats().as_dict()["final_grad_norm"]))
        messages = [str(w.message) for w in caught]
        assert len(messages) == 3, messages  # 4 -> 3 tasks, float32 -> 64 -> 16
        assert all(message.endswith("its state was reset.") for message in messages)
        results[path] = outputs
    for (host, host_norm), (tensor, tensor_norm) in zip(*results.values(), strict=True):
        assert torch.equal(host.isnan(), tensor.isnan())
        assert torch.equal(host.nan_to_num(), tensor.nan_to_num())
        assert host_norm == tensor_norm or (math.isnan(host_norm) and math.isnan(tensor_norm))
    finite = [(u, norm) for u, norm in results["host"] if u.isfinite().all()]
    for update, norm in finite:
        assert norm == pytest.approx(float(update.double().norm()), rel=1e-3)  # half: 1e-3


def test_one_task_is_passed_through(solver_path: str) -> None:
    """The reference returns a single task's gradient untouched: no cap, no norm average."""

    weighting = GCondWeighting(norm_cap=0.1)
    jacobian = 5.0 * torch.randn(1, 12)
    assert torch.equal(weighting(jacobian), torch.ones(1))
    assert torch.equal(weighting.norm_ema, torch.ones(1, dtype=torch.float64))
    aggregator = GCond(norm_cap=0.1)
    assert_close(aggregator(jacobian), jacobian[0])  # bias-corrected momentum of one step


def test_zero_rows_are_never_paired(solver_path: str) -> None:
    """A zero row takes no part: the others resolve as if it were absent (same iteration cap)."""

    jacobian = conflicting_jacobian(3, 25, seed=4, decades=0.5)
    with_zero = torch.stack([jacobian[0], torch.zeros(25, dtype=torch.float64), jacobian[2]])
    weights = GCondWeighting(projection_max_iters=4)(with_zero)
    expected = GCondWeighting(projection_max_iters=4)(jacobian[[0, 2]]) @ jacobian[[0, 2]]
    assert_close(weights @ with_zero, expected)


@pytest.mark.parametrize("use_smooth_logic", [True, False])
def test_exactly_anti_parallel_rows_keep_the_winner(
    use_smooth_logic: bool, solver_path: str
) -> None:
    """
    Rows g and -2g: cosine -1, critical zone. On the first step stability is 0 and the strength
    of row k is (|r_k| / e_k) / sum, with e_k = 0.95 + 0.05 |r_k|: row 1 (norm 2) wins, and the
    loser is removed (zeroed in legacy mode, projected to ~0 in smooth mode).
    """

    g = torch.randn(16, dtype=torch.float64)
    g = g / g.norm()
    jacobian = torch.stack([g, -2.0 * g])
    weighting = GCondWeighting(use_smooth_logic=use_smooth_logic)
    resolved = weighting(jacobian) @ jacobian
    assert_close(resolved, -2.0 * g, atol=1e-7, rtol=1e-7)
    assert float(weighting.min_cosine_sim) == pytest.approx(-1.0)
    assert _ordered_history(weighting)[0] == 1


def test_a_single_iteration_resolves_only_the_worst_pair(solver_path: str) -> None:
    """
    projection_max_iters=1, legacy logic: only the pair with the smallest cosine is resolved,
    here in the main zone: the loser is projected off the winner (PCGrad), nothing else moves.
    """

    rows = torch.tensor([[1.0, 0.0, 0.0], [-0.6, 0.8, 0.0], [-0.3, -0.2, 0.9]], dtype=torch.float64)
    weighting = GCondWeighting(use_smooth_logic=False, projection_max_iters=1)
    resolved = weighting(rows) @ rows

    cosines = (
        torch.nn.functional.normalize(rows, dim=1) @ torch.nn.functional.normalize(rows, dim=1).T
    )
    assert float(cosines[0, 1]) == pytest.approx(-0.6)  # the worst pair, in the main zone
    assert float(weighting.proj_iters) == 1.0
    # First step, stability 0: the longer row relative to its norm average wins; equal norms
    # (both 1) give a tie, which goes to the first row of the pair.
    loser = rows[1] - (rows[1] @ rows[0]) / (rows[0] @ rows[0] + 1e-8) * rows[0]
    assert_close(resolved, rows[0] + loser + rows[2])


def test_the_stochastic_helper_fills_each_row_with_the_averaged_task_gradient() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    parameters = list(model.parameters())
    n_tasks, per_task = 3, 2
    batches = [(torch.randn(5, 4), torch.randn(5, 3)) for _ in range(n_tasks * per_task)]

    expected_rows = []
    for task in range(n_tasks):
        gradients = []
        for x, y in batches[task * per_task : (task + 1) * per_task]:
            loss = ((model(x)[:, task] - y[:, task]) ** 2).mean()
            grads = torch.autograd.grad(loss, parameters)
            gradients.append(torch.cat([g.flatten() for g in grads]))
        expected_rows.append(torch.stack(gradients).mean(dim=0))

    for k, (x, y) in enumerate(batches):
        task = k // per_task
        loss = ((model(x)[:, task] - y[:, task]) ** 2).mean()
        backward_task(loss, task, n_tasks, scale=1.0 / per_task)

    jacobian = torch.cat([p.jac.flatten(start_dim=1) for p in parameters], dim=1)  # type: ignore[attr-defined]
    assert_close(jacobian, torch.stack(expected_rows))


def test_backward_task_equals_torchjd_backward_with_a_one_hot_row() -> None:
    """Same .jac fields as torchjd's own accumulation, also when mixed with it."""

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    results = []
    for ours in (True, False):
        backward(((model(x) - y) ** 2).mean(dim=0))  # a first, full accumulation
        loss = ((model(x)[:, 2] - y[:, 2]) ** 2).mean()
        if ours:
            backward_task(loss, 2, 3, scale=0.5)
        else:
            backward(loss, jac_tensors=torch.tensor([0.0, 0.0, 0.5]))
        results.append([p.jac.clone() for p in model.parameters()])  # type: ignore[attr-defined]
        for p in model.parameters():
            del p.jac  # type: ignore[attr-defined]
    for mine, torchjds in zip(*results, strict=True):
        assert_close(mine, torchjds)


def test_backward_task_with_explicit_inputs_and_unused_ones() -> None:
    used, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    backward_task((used**2).sum(), 1, 2, inputs=[used, unused])
    assert_close(used.jac, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))  # type: ignore[attr-defined]
    assert_close(unused.jac, torch.zeros(2, 2))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="rows"):
        backward_task((used**2).sum(), 0, 5, inputs=[used])
    with pytest.raises(ValueError, match="requires_grad"):
        backward_task((used**2).sum(), 0, 2, inputs=[used.detach()])


def test_the_stochastic_cycle_feeds_gcond() -> None:
    """jac_to_grad after a stochastic cycle equals GCond on the averaged per-task gradients."""

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    parameters = list(model.parameters())
    batches = [(torch.randn(5, 4), torch.randn(5, 3)) for _ in range(3)]
    rows = []
    for task, (x, y) in enumerate(batches):
        loss = ((model(x)[:, task] - y[:, task]) ** 2).mean()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)]))
        backward_task(((model(x)[:, task] - y[:, task]) ** 2).mean(), task, 3)
    weights = jac_to_grad(parameters, GCond())
    expected = GCond()(torch.stack(rows))
    assert_close(torch.cat([p.grad.flatten() for p in parameters]), expected)  # type: ignore[union-attr]
    assert weights is None  # the momentum: an update that no weights of these rows give


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"loss": torch.ones(2)}, "scalar"),
        ({"task": 3}, "task"),
        ({"task": -1}, "task"),
        ({"n_tasks": 0}, "n_tasks"),
    ],
)
def test_the_stochastic_helper_rejects_bad_input(arguments: dict[str, Any], message: str) -> None:
    parameter = torch.ones(2, requires_grad=True)
    call = {"loss": (parameter**2).sum(), "task": 0, "n_tasks": 3} | arguments
    with pytest.raises(ValueError, match=message):
        backward_task(**call)


class _LargeOperationCounter(TorchDispatchMode):
    """Counts the operations that touch a tensor with at least ``threshold`` elements."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold, self.count = threshold, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        tensors = [
            a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor)
        ]
        if any(t.numel() >= self.threshold for t in tensors):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", ["host", "tensor"])
def test_no_parameter_sized_work_per_pair_or_iteration(solver: str) -> None:
    """
    The operations that touch n-sized tensors are the same few whatever m and however many
    resolution iterations run: the resolution itself works on m x m matrices.
    """

    n = 1000
    counts, iterations = {}, {}
    for m in (2, 12):
        aggregator = GCond()
        jacobian = conflicting_jacobian(m, n, seed=m, decades=0.5, dtype=torch.float32)
        aggregator(jacobian)
        with solver_path(solver), _LargeOperationCounter(n) as counter:  # type: ignore[arg-type]
            aggregator(jacobian)
        counts[m] = counter.count
        iterations[m] = float(aggregator.weighting.proj_iters)
    assert iterations[12] >= 12  # many pairs were resolved at m=12, few at m=2
    assert iterations[2] <= 4
    assert counts[2] == counts[12]
    assert counts[2] <= 13  # the stream, the momentum, the update's norm for stats(), ...


def test_sequences_of_thresholds_and_weights_are_stored_as_tuples() -> None:
    """As the reference, which takes lists from a config: stored as tuples (the repr shows it)."""

    aggregator = GCond()
    aggregator.conflict_thresholds = [-0.9, -0.6, -0.1]  # type: ignore[assignment]
    aggregator.tie_breaking_weights = [0.5, 0.5]  # type: ignore[assignment]
    assert aggregator.weighting.conflict_thresholds == (-0.9, -0.6, -0.1)
    assert aggregator.weighting.tie_breaking_weights == (0.5, 0.5)


def test_changing_the_window_restarts_the_history() -> None:
    weighting = GCondWeighting(dominance_window=3)
    jacobian = conflicting_jacobian(3, 20, seed=6, decades=0.5)
    weighting(jacobian)
    weighting.dominance_window = 5
    weighting(jacobian)
    assert weighting.winner_history.shape == (5,)
    assert int(weighting.winner_count) <= float(weighting.proj_iters)  # only the new call's winners


@pytest.mark.parametrize("use_smooth_logic", [True, False])
def test_ties_go_to_the_first_task_so_order_matters(use_smooth_logic: bool) -> None:
    """
    The documented exception to permutation invariance: exactly anti-parallel rows of equal norm
    tie in the arbitration, and the tie goes to the first row of the pair (as in the reference).
    """

    g = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    rows = torch.stack([g, -g])
    update = GCond(use_smooth_logic=use_smooth_logic)(rows)
    permuted = GCond(use_smooth_logic=use_smooth_logic)(rows.flip(0))
    assert_close(update, g, atol=1e-7, rtol=1e-7)
    assert_close(permuted, -g, atol=1e-7, rtol=1e-7)


def test_not_linear_under_scaling_when_the_arbitration_flips() -> None:
    """
    The documented exception to linearity: the arbitrator compares each norm with its running
    average, so rescaling a row can change the winner. Rows g and -2g: scaled by (1, 1) row 1
    wins, by (3, 1) row 0 wins; their mean scaling (2, 1) ties and row 0 wins.
    """

    g = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    rows = torch.stack([g, -2.0 * g])

    def aggregate(scales: tuple[float, float]) -> Tensor:
        return GCond()(torch.tensor(scales, dtype=torch.float64).unsqueeze(1) * rows)

    assert_close(aggregate((1.0, 1.0)), -2.0 * g, atol=1e-7, rtol=1e-7)
    assert_close(aggregate((3.0, 1.0)), 3.0 * g, atol=1e-7, rtol=1e-7)
    midpoint = aggregate((2.0, 1.0))
    assert_close(midpoint, 2.0 * g, atol=1e-7, rtol=1e-7)
    assert not torch.allclose(midpoint, (aggregate((1.0, 1.0)) + aggregate((3.0, 1.0))) / 2)


@pytest.mark.parametrize("steps_before", [1, 2])
def test_a_checkpoint_after_an_odd_or_even_step_resumes_bit_identically(steps_before: int) -> None:
    """
    The previous Jacobian is loaded into the half of the scratch buffer that an uninterrupted run
    holds it in: in the other half, its products with the next Jacobian come out of other
    columns of one matmul, and rounded differently (this case did, after an odd step).
    """

    generator = torch.Generator().manual_seed(1)
    jacobians = [torch.randn(5, 816, generator=generator) for _ in range(steps_before + 2)]
    uninterrupted = GCond()
    expected = [uninterrupted(jacobian) for jacobian in jacobians]
    first = GCond()
    for jacobian in jacobians[:steps_before]:
        first(jacobian)
    resumed = GCond()
    resumed.load_state_dict(first.state_dict())
    for jacobian, output in zip(jacobians[steps_before:], expected[steps_before:], strict=True):
        assert torch.equal(resumed(jacobian), output)


@pytest.mark.parametrize("sequence", SEQUENCES[:4], ids=[s["name"] for s in SEQUENCES[:4]])
def test_statistics_are_the_official_ones(sequence: dict[str, Any]) -> None:
    """proj_iters, min_cosine_sim, raw_norm/*, norm_ema/* and final_grad_norm, as the official."""

    aggregator = _from_config(sequence["config"])
    for step in sequence["steps"]:
        jacobian = torch.tensor(step["jacobian"])
        update = aggregator(jacobian)
        stats = aggregator.stats().as_dict()
        assert stats["step"] == int(aggregator.weighting.step_count)
        assert stats["final_grad_norm"] == pytest.approx(float(update.norm()), rel=1e-6)
        for k, norm in enumerate(jacobian.double().norm(dim=1).tolist()):
            assert stats[f"raw_norm/task_{k}"] == pytest.approx(norm, rel=1e-6)
            assert stats[f"norm_ema/task_{k}"] == pytest.approx(step["norm_ema_after"][k])
        if step["discrete_robust"]:
            assert stats["proj_iters"] == step["proj_iters"]
            assert stats["min_cosine_sim"] == pytest.approx(step["min_cosine_sim"], abs=1e-5)


@pytest.mark.parametrize("use_smooth_logic", [True, False])
def test_statistics_name_the_zone_and_the_winner(use_smooth_logic: bool) -> None:
    """Rows g and -2g: a critical conflict, which task 'b' (the longer row) wins."""

    g = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    aggregator = GCond(use_smooth_logic=use_smooth_logic, projection_max_iters=1)
    aggregator.tasks = ["a", "b"]
    aggregator(torch.stack([g, -2.0 * g]))
    stats = aggregator.stats().as_dict()
    assert (stats["zone"], stats["winner"]) == ("critical", "b")
    assert stats["min_cosine_sim"] == pytest.approx(-1.0)
    assert set(stats) >= {"raw_norm/a", "raw_norm/b", "norm_ema/a", "norm_ema/b"}


def test_statistics_are_read_on_the_host_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    aggregator = GCond()
    jacobian = conflicting_jacobian(4, 30, seed=2, decades=1.0, dtype=torch.float32)
    aggregator(jacobian)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a host read")

    with solver_path("tensor"), monkeypatch.context() as patch:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            patch.setattr(Tensor, name, refuse)
        aggregator(jacobian)
        stats = aggregator.stats()
    assert isinstance(stats.proj_iters, Tensor)
    assert stats.as_dict()["proj_iters"] >= 1.0


def _three_task_steps(seed: int, count: int) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A model of three tasks, losses of conflicting scales, and ``count`` batches."""

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, [(torch.randn(16, 5), torch.randn(16, 3)) for _ in range(count)]


def _task_losses(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return torch.tensor([1.0, -1.0, 0.5]) * ((model(inputs) - targets) ** 2).mean(dim=0)


def _flat_gradient(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]


def _flat_jacobian(losses: Tensor, model: nn.Module) -> Tensor:
    rows = [
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in losses
    ]
    return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])


def test_the_resolution_weights_make_the_resolved_gradient_not_the_update() -> None:
    """
    The momentum carries the earlier steps: from the second step on, no weights of the rows give
    the update, so jac_to_grad returns none, and resolution_weights give g_t, before momentum.
    """

    beta = 0.85
    model, batches = _three_task_steps(seed=0, count=3)
    aggregator, momentum = GCond(momentum_beta=beta), torch.zeros(0)
    for step, batch in enumerate(batches, start=1):
        losses = _task_losses(model, batch)
        jacobian = _flat_jacobian(losses, model)
        backward(losses)
        assert jac_to_grad(list(model.parameters()), aggregator) is None
        update, weights = _flat_gradient(model), aggregator.resolution_weights
        assert weights is not None
        assert weights.shape == (3,)
        resolved = weights @ jacobian
        momentum = (1 - beta) * resolved if step == 1 else beta * momentum + (1 - beta) * resolved
        assert_close(update, momentum / (1 - beta**step))
        if step > 1:  # wᵀJ would misreport the update by tens of percent
            assert relative_error(update, resolved) > 0.1
        model.zero_grad()


def test_no_api_reports_weights_that_are_not_the_update(tmp_path: Path) -> None:
    """Every path that returns or logs weights: none for GCond, the update's without momentum."""

    model, batches = _three_task_steps(seed=1, count=3)
    parameters = list(model.parameters())

    # jac_to_grad, also through with_grad_scaler: no weights, with or without momentum.
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for aggregator in (GCond(), GCond(momentum_beta=0.0), with_grad_scaler(GCond(), scaler)):
        for batch in batches:
            backward(_task_losses(model, batch))
            assert jac_to_grad(parameters, aggregator) is None
            model.zero_grad()
    # The comparison app shows the resolution weights, under that name in its report.
    gcond = GCond()
    backward(_task_losses(model, batches[0]))
    jac_to_grad(parameters, gcond)
    model.zero_grad()
    assert gcond.resolution_weights is not None
    assert applied_weights(gcond, None) is gcond.resolution_weights
    assert applied_weights(GCond(), None) is None  # before its first call

    # The momentum-free resolution as a WeightedAggregator: its weights give the update.
    resolution = WeightedAggregator(GCondWeighting())
    for batch in batches:
        losses = _task_losses(model, batch)
        jacobian = _flat_jacobian(losses, model)
        backward(losses)
        weights = jac_to_grad(parameters, resolution)
        assert_close(weights @ jacobian, _flat_gradient(model))
        model.zero_grad()

    # The trainers' step (Lightning, Hugging Face), the curriculum: no weights, none logged.
    step = JacobianStep(GCond())
    curriculum = Curriculum([Phase("all", tasks=["a", "b", "c"], steps=5)], GCond(), model=model)
    for batch in batches:
        step.backward(step.take(_task_losses(model, batch)))
        assert step.resolve(parameters) is None
        assert step.aggregated
        assert step.weight_scalars() == {}
        model.zero_grad()
        losses = _task_losses(model, batch)
        assert curriculum.backward({name: losses[k] for k, name in enumerate("abc")}) == {}
        curriculum.step()
        model.zero_grad()

    # The loggers refuse it; the diagnostics engine records its Gramian, and no weights.
    with pytest.raises(TypeError, match="`GCond` does not combine the rows with a weighting"):
        WeightLogger(tmp_path / "weights.jsonl").attach(GCond())
    with pytest.raises(TypeError, match=r"record\(gramian, weights=None"):  # the old protocol
        JacobianStep(GCond(), diagnostics=_Recorder())
    monitored = JacobianStep(GCond(), diagnostics=True)
    monitor = monitored.recorder
    assert isinstance(monitor, ConflictMonitor)
    for batch in batches:
        monitored.backward(monitored.take(_task_losses(model, batch)))
        jacobian = torch.cat([p.jac.flatten(1) for p in parameters], dim=1)  # type: ignore[attr-defined]
        monitored.resolve(parameters)
        report = monitor.report()
        assert report.gradient_norms == pytest.approx(
            dict(
                zip(
                    ("task_0", "task_1", "task_2"),
                    jacobian.double().norm(dim=1).tolist(),
                    strict=True,
                )
            )
        )
        assert report.balance_ratio == 0.0  # no weights
        assert report.weight_deviation == 0.0
        model.zero_grad()
    assert monitor.step_count == len(batches)


class _Recorder:
    def record(self, gramian: Tensor, weights: Tensor, tasks: object, /) -> None:
        raise AssertionError("a recorder of weights must not be attached to GCond")
