"""The synthetic workload: the setting of the Golden Pendulum paper, losses 300x apart."""

from __future__ import annotations

import torch

from ._base import Task, Workload, split


def synthetic(seed: int) -> Workload:
    """
    Four heads on shared features, the setting of the Golden Pendulum paper: losses of about
    200 (ranking), 0.69 (classification), 0.6 (regression) and 1 (a hedge that pulls against
    the ranking), a disparity of about 300x.
    """

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4096, 16, generator=generator)
    a, b, c, d = torch.randn(4, 16, generator=generator)
    a, d = a / a.norm(), d / d.norm()
    noise = 0.1 * torch.randn(4096, 4, generator=generator)
    targets = torch.stack(
        [
            14.0 * (inputs @ a) + noise[:, 0],
            ((inputs @ b) > 0).float(),
            0.8 * torch.tanh(inputs @ c / 4.0) + noise[:, 2],
            -(inputs @ a) + 0.5 * (inputs @ d) + noise[:, 3],
        ],
        dim=1,
    )
    tasks = (
        Task("ranking", "regression"),
        Task("classification", "binary"),
        Task("regression", "regression"),
        Task("hedge", "regression"),
    )
    return split(
        "synthetic",
        "4 heads, losses ~200 / 0.69 / 0.6 / 1",
        tasks,
        inputs,
        targets,
        seed,
        source="generated here, after the four-task setting of the Golden Pendulum paper "
        "(a ranking loss 300x the others and a hedge that conflicts with it).",
    )
