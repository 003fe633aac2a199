"""
Writes ``checkpoints.pt``: for each stateful aggregator, its ``state_dict`` after a few calls and
the inputs and outputs of the calls that follow it.

The file in the repository was written by the code of commit a3d3d89 (before the package was
reorganised into kernels); ``tests/aggregation/test_checkpoints.py`` loads each state into a fresh
instance of today's code with ``weights_only=True`` and checks that it continues with the same
outputs, so a checkpoint written by an earlier release keeps working. Run from the repository root:
``python -m tests.data.make_checkpoints`` (only to add a case: it overwrites the file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

import torchjd_golden

from .._inputs import conflicting_jacobian

PATH = Path(__file__).with_name("checkpoints.pt")
BEFORE, AFTER = 5, 4  # calls before the checkpoint, calls replayed after it

# name -> (class, keyword arguments); the test builds the fresh instance from these.
CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "AdaptiveGoldenPendulum": ("AdaptiveGoldenPendulum", {}),
    "GABA": ("GABA", {"beta": 0.9, "warmup_steps": 2}),
    "ExcessMTL": ("ExcessMTL", {"n_warmup_steps": 2}),
    "GCond": ("GCond", {"norm_cap": 5.0}),
    "GCond legacy": ("GCond", {"use_smooth_logic": False, "momentum_beta": 0.5}),
}


def _losses(jacobian: Tensor) -> Tensor:
    return (jacobian**2).sum(dim=1) + 1e-3


def _call(aggregator: nn.Module, jacobian: Tensor) -> Tensor:
    if isinstance(aggregator, torchjd_golden.AdaptiveGoldenPendulum):
        aggregator.losses = _losses(jacobian)  # type: ignore[assignment]
    output: Tensor = aggregator(jacobian)
    return output


def main() -> None:
    cases = {}
    for index, (name, (class_name, keywords)) in enumerate(CONFIGS.items()):
        inputs = [
            conflicting_jacobian(4, 24, seed=100 * index + s, decades=3.0)
            for s in range(BEFORE + AFTER)
        ]
        aggregator = getattr(torchjd_golden, class_name)(**keywords)
        for jacobian in inputs[:BEFORE]:
            _call(aggregator, jacobian)
        state = {key: value.clone() for key, value in aggregator.state_dict().items()}
        outputs = [_call(aggregator, jacobian) for jacobian in inputs[BEFORE:]]
        cases[name] = {
            "class": class_name,
            "keywords": keywords,
            "state_dict": state,
            "inputs": torch.stack(inputs[BEFORE:]),
            "outputs": torch.stack(outputs),
        }
    torch.save(cases, PATH)


if __name__ == "__main__":
    main()
