"""The workloads of ``torchjd-golden compare``: their tasks, their targets and their splits."""

from __future__ import annotations

import random
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mnist1d.data import get_dataset_args, get_templates
from mnist1d.transform import interpolate
from sklearn.datasets import load_digits

from torchjd_golden.compare._workloads import (
    WORKLOADS,
    Task,
    _mnist1d,
    digits,
    many_tasks,
    mnist1d,
    multi_digits,
    split_indices,
    synthetic,
)
from torchjd_golden.compare._workloads._digits import SHIFT, overlay
from torchjd_golden.compare._workloads._mnist1d import LATENTS, generated


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


TASKS = {
    "synthetic": 4,
    "digits": 3,
    "multi-digits": 2,
    "mnist1d": 4,
    "many-tasks": 40,
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_each_workload_has_its_tasks_and_one_target_column_each(name: str) -> None:
    workload = WORKLOADS[name](0)
    assert workload.name == name
    assert len(workload.tasks) == TASKS[name]
    assert len({t.name for t in workload.tasks}) == len(workload.tasks)
    assert workload.train_targets.shape == (workload.train_inputs.shape[0], len(workload.tasks))
    assert workload.test_targets.shape == (workload.test_inputs.shape[0], len(workload.tasks))
    assert workload.source  # cited in the report's footnote
    n = workload.train_inputs.shape[0] + workload.test_inputs.shape[0]
    assert workload.test_inputs.shape[0] == n // 5


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


def test_a_regression_head_predicts_the_standardised_target_in_its_units() -> None:
    task = Task("r", "regression", target_mean=10.0, target_std=2.0)
    output = torch.tensor([[0.5], [-1.0]])  # predictions 11 and 8
    target = torch.tensor([12.0, 8.0])
    assert float(task.loss(output, target)) == pytest.approx((1.0 + 0.0) / 2)
    # R2: residual 1 against a total of 8 around the mean 10.
    assert task.score(output, target) == pytest.approx(1.0 - 1.0 / 8.0)


def test_multi_digits_places_the_left_digit_top_left_and_the_right_one_shifted() -> None:
    left = torch.zeros(1, 8, 8)
    left[0, 0, 0], left[0, 7, 7] = 0.25, 0.5
    right = torch.zeros(1, 8, 8)
    right[0, 0, 0], right[0, 5, 5], right[0, 7, 7] = 1.0, 0.25, 0.75
    canvas = overlay(left, right)[0]
    assert canvas.shape == (8 + SHIFT, 8 + SHIFT)
    expected = torch.zeros(10, 10)
    expected[0, 0] = 0.25  # the left digit alone
    expected[2, 2] = 1.0  # the right digit's corner
    expected[7, 7] = 0.5  # both, the pixel-wise maximum: left 0.5, right 0.25
    expected[9, 9] = 0.75
    torch.testing.assert_close(canvas, expected, rtol=0.0, atol=0.0)


def test_multi_digits_labels_are_the_digits_placed_left_and_right() -> None:
    """
    Each test pair's left digit is the next image of the test part; its right digit is the one
    image whose overlay gives the pair's pixels, drawn from the test part only.
    """

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.float32)
    test, train = split_indices(images.shape[0], seed=3)
    workload = multi_digits(3)
    assert workload.train_inputs.shape == (train.numel(), 100)
    assert workload.test_inputs.shape == (test.numel(), 100)
    for i in range(12):
        pair = workload.test_inputs[i].reshape(10, 10)
        left = test[i]
        candidates = overlay(images[left].expand(images.shape[0], 8, 8), images)
        matches = (candidates == pair).flatten(start_dim=1).all(dim=1).nonzero().flatten()
        assert matches.numel() >= 1
        assert set(matches.tolist()) <= set(test.tolist())  # no training image in a test pair
        assert workload.test_targets[i, 0] == labels[left]
        assert set(labels[matches].tolist()) == {float(workload.test_targets[i, 1])}
    # The right digits are drawn at random: they are not the left ones.
    assert not torch.equal(workload.test_targets[:, 0], workload.test_targets[:, 1])


def _regenerated(index: int) -> np.ndarray:
    """Signal ``index`` made again from its recorded draws, the transform step by step."""

    signals, arguments = generated(), get_dataset_args()
    draws = signals.draws[index]
    template = get_templates()["x"][int(signals.labels[index])]
    signal = _mnist1d.clean_signal(template, draws, arguments)
    zero = signal == 0
    signal = np.where(zero, draws.correlated_noise, signal) + draws.iid_noise
    signal = signal - draws.shear * np.linspace(-0.5, 0.5, signal.shape[0])
    return interpolate(signal, arguments.final_seq_length)


def test_mnist1d_signals_are_made_again_from_their_recorded_latents() -> None:
    """
    The replayed draws give the package's own signals back: the package standardises the whole
    data set, so each of its signals is (regenerated - mean) / std with one mean and one std.
    """

    signals = generated()
    indices = (0, 1234, 4999)  # a training signal of the package, then test ones
    raw = np.stack([_regenerated(i) for i in indices])
    package = signals.inputs[list(indices)].double().numpy()
    # Within a signal the 40 values fix the affine map; across signals it must be the same one.
    fits = [np.polyfit(p, r, 1) for p, r in zip(package, raw, strict=True)]
    std, mean = np.mean(fits, axis=0)
    # The package's signals are float32: each carries its rounding, eps times its size.
    eps = torch.finfo(torch.float32).eps
    atol = 16 * eps * np.abs(package).max()
    np.testing.assert_allclose(package, (raw - mean) / std, rtol=0, atol=atol)
    np.testing.assert_allclose(fits, [[std, mean]] * len(indices), rtol=16 * eps, atol=atol * std)


def test_mnist1d_latents_are_the_generators_and_in_its_ranges() -> None:
    signals, arguments = generated(), get_dataset_args()
    latents = dict(zip(LATENTS, signals.latents.T, strict=True))
    assert signals.inputs.shape == (arguments.num_samples, arguments.final_seq_length)
    assert torch.equal(latents["padding"], latents["padding"].round())
    assert latents["padding"].min() >= arguments.padding[0]
    assert latents["padding"].max() <= arguments.padding[1]
    assert set(latents["shift"].long().tolist()) == set(range(arguments.max_translation))
    half = arguments.scale_coeff / 2
    assert latents["scale"].min() >= 1 - half
    assert latents["scale"].max() <= 1 + half
    assert latents["shear"].abs().max() <= arguments.shear_scale / 2
    assert latents["noise"].min() > 0
    draws = signals.draws[17]
    assert latents["shift"][17] == draws.shift
    assert latents["shear"][17] == pytest.approx(draws.shear, rel=1e-6)


def test_mnist1d_tasks_are_the_class_and_latents_with_losses_far_apart() -> None:
    signals = generated()
    test, _ = split_indices(signals.inputs.shape[0], seed=2)
    workload = mnist1d(2)
    assert [t.name for t in workload.tasks] == ["class", "shift", "shear", "noise"]
    torch.testing.assert_close(workload.test_inputs, signals.inputs[test])
    assert torch.equal(workload.test_targets[:, 0], signals.labels[test])
    for column, task in enumerate(workload.tasks[1:], start=1):
        expected = signals.latents[test, LATENTS.index(task.name)]
        assert torch.equal(workload.test_targets[:, column], expected)
    # A head that outputs zero predicts each latent's mean: its loss is the latent's variance,
    # in the latent's units.
    losses = [
        float(task.loss(torch.zeros(len(target), task.n_outputs), target))
        for task, target in zip(workload.tasks, workload.train_targets.T, strict=True)
    ]
    assert losses[0] == pytest.approx(np.log(10), rel=1e-6)
    assert losses[1] == pytest.approx(14.0**2, rel=0.05)  # shift: uniform on 0..47
    assert losses[2] == pytest.approx(0.75**2 / 12, rel=0.05)  # shear: uniform, width 0.75
    assert max(losses) / min(losses) > 1e5


def test_many_tasks_are_40_binary_attributes() -> None:
    signals = generated()
    workload = many_tasks(0)
    assert all(task.kind == "binary" for task in workload.tasks)
    targets = torch.cat([workload.train_targets, workload.test_targets])
    inputs = torch.cat([workload.train_inputs, workload.test_inputs])
    order = torch.cat(list(reversed(split_indices(inputs.shape[0], seed=0))))
    assert torch.equal(inputs, signals.inputs[order])
    labels = signals.labels[order]
    # One class against the rest, for each class.
    assert torch.equal(targets[:, :10], torch.nn.functional.one_hot(labels.long(), 10).float())
    # Each latent above 10 cuts: nested, with the prevalence the cut says.
    names = [task.name for task in workload.tasks]
    for latent in ("shift", "shear", "noise"):
        columns = [names.index(f"{latent}>p{centile:02d}") for centile in range(5, 100, 10)]
        cuts = targets[:, columns]
        assert torch.all(cuts[:, 1:] <= cuts[:, :-1])
        values = signals.latents[order, LATENTS.index(latent)].double()
        median = torch.quantile(values, 0.55)
        assert torch.equal(cuts[:, 5], (values > median).float())
    prevalence = targets[:, 10:20].mean(dim=0)  # the shift's cuts; ties make it uneven
    expected = 1 - torch.arange(5, 100, 10) / 100
    assert torch.all((prevalence - expected).abs() < 0.04)


def test_no_workload_touches_the_network_the_files_or_the_global_generators(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*_arguments: object, **_keywords: object) -> None:
        raise AssertionError("a workload reached for the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr("requests.get", refuse)
    monkeypatch.chdir(tmp_path)  # where mnist1d's get_dataset would save its copy
    generated.cache_clear()  # made here, under the patches, not by an earlier test
    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    for name, make in WORKLOADS.items():
        assert make(0).name == name
    assert (np.random.rand(), random.random()) == expected
    assert list(tmp_path.iterdir()) == []
