"""
Workloads on scikit-learn's bundled 8x8 digits: the digits as three tasks, and two digits
overlaid as in MultiMNIST. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import Task, Workload, split, split_indices

DIGITS_SOURCE = (
    "scikit-learn's load_digits: the test set of UCI's Optical Recognition of Handwritten "
    "Digits (Alpaydin & Kaynak, 1998; CC BY 4.0), bundled with scikit-learn (BSD-3-Clause)"
)

SIDE = 8
"""The side of a digit image, in pixels."""

SHIFT = 2
"""
How far the right digit sits below and to the right of the left one: MultiMNIST's 6 pixels of
28 (Sener & Koltun's released code) scaled to 8 pixels.
"""

CANVAS = SIDE + SHIFT

PAIRS_PER_IMAGE = 1
"""How many pairs each image is the left digit of; 1 as in the MultiMNIST construction."""


def digits(seed: int) -> Workload:
    """
    scikit-learn's bundled 8x8 digits (1797 images) as three tasks: the class (10-way), the
    parity, and the size of the digit as a number (regression, losses of about 30).
    """

    data = _load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.float32)
    targets = torch.stack([labels, labels.remainder(2.0), labels], dim=1)
    tasks = (Task("class", "multiclass", 10), Task("parity", "binary"), Task("size", "regression"))
    return split(
        "digits",
        "scikit-learn's 8x8 digits as class, parity and size",
        tasks,
        inputs,
        targets,
        seed,
        source=f"{DIGITS_SOURCE}.",
    )


def multi_digits(seed: int) -> Workload:
    """
    MultiMNIST (Sener & Koltun, 2018) on the 8x8 digits: two digits overlaid on a 10x10 canvas,
    one at the top left and one :data:`SHIFT` pixels below and to the right of it, the pixel-wise
    maximum where they overlap; the tasks are the class of the left digit and of the right one
    (10-way each). As in the construction of the paper's code, each image is the left digit of
    one pair (:data:`PAIRS_PER_IMAGE`) whose right digit is drawn at random from the same part
    of the split, so that no image of the test pairs is in a training pair.
    """

    data = _load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    test, train = split_indices(images.shape[0], seed)
    train_inputs, train_targets = _pairs(images[train], labels[train], generator)
    test_inputs, test_targets = _pairs(images[test], labels[test], generator)
    return Workload(
        name="multi-digits",
        description=f"two 8x8 digits overlaid {SHIFT} px apart (MultiMNIST), left and right class",
        tasks=(Task("left", "multiclass", 10), Task("right", "multiclass", 10)),
        train_inputs=train_inputs,
        train_targets=train_targets,
        test_inputs=test_inputs,
        test_targets=test_targets,
        source="the MultiMNIST construction of Sener & Koltun, Multi-Task Learning as "
        "Multi-Objective Optimization (NeurIPS 2018) and their released code: the left digit "
        "at the top left, the right one 6 px of 28 lower and further right, the pixel-wise "
        f"maximum where they overlap; here {SHIFT} px of 8 on a {CANVAS}x{CANVAS} canvas, not "
        f"resized; on {DIGITS_SOURCE}.",
    )


def overlay(left: Tensor, right: Tensor) -> Tensor:
    """
    ``left`` (``n x 8 x 8``) at the top left of a 10x10 canvas and ``right`` :data:`SHIFT`
    pixels lower and further right, the pixel-wise maximum where they overlap (the pixels are
    not negative, so the maximum is also what each digit alone puts where the other is not).
    """

    canvas = torch.zeros(left.shape[0], 2, CANVAS, CANVAS)
    canvas[:, 0, :SIDE, :SIDE] = left
    canvas[:, 1, SHIFT:, SHIFT:] = right
    return canvas.amax(dim=1)


def _pairs(images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each image as the left digit of :data:`PAIRS_PER_IMAGE` pairs, flattened, and the labels."""

    left = torch.arange(images.shape[0]).repeat_interleave(PAIRS_PER_IMAGE)
    right = torch.randint(0, images.shape[0], left.shape, generator=generator)
    inputs = overlay(images[left], images[right]).flatten(start_dim=1)
    return inputs, torch.stack([labels[left], labels[right]], dim=1)


def _load_digits() -> Any:
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - an optional dependency
    except ImportError as error:
        raise ImportError(
            "The digits workloads need scikit-learn: pip install 'torchjd-golden[compare]'."
        ) from error
    return load_digits()
