"""
The five presets of golden-pendulum-mtl: their phases, a curriculum built from one, and the
aggregator of a phase built from a config (see docs/guides/presets.rst).

Run: ``python examples/presets.py``
"""

from __future__ import annotations

import argparse

from torchjd_golden import Curriculum, aggregator_from_config, get_preset, list_presets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()

    print("preset              phase        steps  frozen   lam      lr  warm-up  tasks")
    for name in list_presets():
        for phase in get_preset(name).phases:
            print(
                f"{name:20s}{phase.name:12s}{phase.steps:6d}  {phase.freeze_backbone!s:6s}"
                f"{phase.lam:6.1f}{phase.lr:8.0e}{phase.warmup_steps:9d}  {sorted(phase.tasks)}"
            )

    curriculum = Curriculum.from_preset("finance_4phase")
    print(f"\nfinance_4phase: {curriculum.total_steps} steps, first lr {curriculum.current_lr:.1e}")
    for config in (
        {"preset": "robotics_control"},
        {"preset": "finance_4phase", "phase": "B_risk", "name": "DynamicK"},
    ):
        print(f"aggregator_from_config({config}) = {aggregator_from_config(config)!r}")


if __name__ == "__main__":
    main()
