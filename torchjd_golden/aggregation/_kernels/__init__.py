"""
The sequential solvers: small loops over tasks on ``m x m`` matrices, one module each, with both
execution paths side by side (see :mod:`._paths`).

- :mod:`.pcgrad`: the PCGrad pass in coefficient space (Golden Pendulum);
- :mod:`.golden_qp`: Golden Pendulum's projected-gradient QP;
- :mod:`.gcond`: GCond's arbitration loop.
"""

from ._paths import SolverPath, chosen_path, solver_path

__all__ = ["SolverPath", "chosen_path", "solver_path"]
