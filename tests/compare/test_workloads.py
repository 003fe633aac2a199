from __future__ import annotations

import pytest
import torch

from torchjd_golden.compare._workloads import WORKLOADS, Task, digits, synthetic


def test_synthetic_losses_differ_by_about_300x_at_initialisation() -> None:
    workload = synthetic(0)
    zero = torch.zeros(workload.train_inputs.shape[0], 1)
    losses = [
        task.loss(zero, target)
        for task, target in zip(workload.tasks, workload.train_targets.T, strict=True)
    ]
    ranking, classification = float(losses[0]), float(losses[1])
    assert ranking == pytest.approx(200.0, rel=0.1)
    assert classification == pytest.approx(0.693, rel=0.01)
    assert 250.0 < ranking / classification < 350.0


def test_the_hedge_conflicts_with_the_ranking() -> None:
    targets = synthetic(0).train_targets
    correlation = torch.corrcoef(targets[:, [0, 3]].T)[0, 1]
    assert correlation < -0.5


def test_digits_ship_with_scikit_learn_and_make_three_tasks() -> None:
    workload = digits(0)
    assert [t.name for t in workload.tasks] == ["class", "parity", "size"]
    assert workload.train_inputs.shape[0] + workload.test_inputs.shape[0] == 1797
    labels = torch.cat([workload.train_targets[:, 0], workload.test_targets[:, 0]])
    assert set(labels.long().tolist()) == set(range(10))
    assert torch.equal(workload.train_targets[:, 1], workload.train_targets[:, 0].remainder(2))


@pytest.mark.parametrize("name", WORKLOADS)
def test_splits_are_disjoint_and_seeded(name: str) -> None:
    first, again, other = WORKLOADS[name](0), WORKLOADS[name](0), WORKLOADS[name](1)
    assert torch.equal(first.test_inputs, again.test_inputs)
    assert not torch.equal(first.test_inputs, other.test_inputs)
    train_rows = {tuple(row.tolist()) for row in first.train_inputs[:200]}
    assert not train_rows & {tuple(row.tolist()) for row in first.test_inputs}


def test_task_scores_by_hand() -> None:
    regression, binary, multiclass = (
        Task("r", "regression"),
        Task("b", "binary"),
        Task("c", "multiclass", 3),
    )
    target = torch.tensor([1.0, 2.0, 3.0])
    assert regression.score(target.unsqueeze(1), target) == pytest.approx(1.0)
    assert regression.score(torch.full((3, 1), 2.0), target) == pytest.approx(0.0)
    assert binary.score(torch.tensor([[1.0], [-1.0]]), torch.tensor([1.0, 1.0])) == pytest.approx(
        0.5
    )
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert multiclass.score(logits, torch.tensor([0.0, 1.0])) == pytest.approx(0.5)
    assert multiclass.metric == "accuracy"
    assert regression.metric == "R2"
