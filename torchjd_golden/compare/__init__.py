"""
The comparison app, ``torchjd-golden compare``: trains each method on small multi-task problems
over several seeds and reports test metrics, Δm% against single-task baselines, the balance of
the task weights and the time per step, with figures.

Its optional dependencies (the ``compare`` extra: matplotlib, scikit-learn, tqdm, cvxpy) are
imported only where a run needs them, so that ``import torchjd_golden`` never imports them.
"""

from ._cli import main

__all__ = ["main"]
