r"""
The exact step on an FSDP2 (``fully_shard``) module: the rows of the Jacobian on this rank's
shards, one ordinary backward pass per task.

FSDP2 reduce-scatters the gradient of each pass, so after the pass of task :math:`k` the sharded
``.grad`` of every parameter holds this rank's shard of the rank-averaged gradient of
:math:`L_k`: row :math:`k` of the step's Jacobian, restricted to this rank's columns. Three
things make the :math:`m` passes cost what :math:`m` plain backward passes cost, and no more:

- ``.grad`` is cleared before each pass, since FSDP2 adds the new reduced gradient into it;
- the parameters stay unsharded between the passes (``reshard_after_backward`` off, then the
  user's setting back for the last pass): the same all-gathers as one plain step;
- a module whose gradient sync is off (``set_requires_gradient_sync(False)``, FSDP2's way to
  accumulate without communication) is refused: its gradients would not be reduced, and the
  Gramian of unreduced rows is not the step's.

torchjd's autojac cannot do this: its ``.jac`` fields land on FSDP's hidden unsharded
parameters, and its ``torch.autograd.grad`` bypasses the reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ._collectives import RankGroup


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is (or holds) an FSDP2 module."""

    return any(isinstance(sub, FSDPModule) for sub in module.modules())


class FullyShardedRows:
    """The Jacobian's rows on this rank's shards of an FSDP2 module's parameters."""

    def __init__(self, module: nn.Module, parameters: Sequence[Tensor]) -> None:
        sharded = [p for p in parameters if isinstance(p, DTensor)]
        if not sharded:
            raise ValueError(
                "The FSDP2 module has no sharded parameter: make the JacobianDescent after "
                "`fully_shard` and before the first forward (FSDP2's root module lists its "
                "unsharded parameters between a forward and its backward)."
            )
        mesh = sharded[0].device_mesh
        if mesh.ndim != 1:
            raise ValueError(
                "JacobianDescent supports FSDP2 on a 1-D device mesh (fully sharded data "
                f"parallelism). Found a mesh of {mesh.ndim} dimensions (HSDP or tensor "
                "parallelism)."
            )
        self.ranks = RankGroup(mesh.get_group())
        self._groups = [
            group
            for sub in module.modules()
            if isinstance(sub, FSDPModule)
            for group in sub._get_fsdp_state()._fsdp_param_groups
        ]

    def check_gradient_sync(self) -> None:
        """Refuses a module whose gradient reduction was turned off."""

        if any(not group.reduce_grads for group in self._groups):
            raise RuntimeError(
                "JacobianDescent needs FSDP2 to reduce-scatter each task's gradient, but gradient "
                "sync is off on this module (`set_requires_gradient_sync(False)`): every Gramian "
                "would be this rank's alone. Leave gradient sync on; to accumulate micro-batches, "
                "call `JacobianDescent.accumulate` for each and `resolve` once."
            )

    def rows(self, losses: Sequence[Tensor], parameters: Sequence[Tensor]) -> Tensor:
        """
        The ``[m, N]`` rows of the Jacobian of ``losses`` on this rank's shards of ``parameters``
        (flattened in order): one backward pass per loss. The parameters' ``.grad`` are left
        empty.
        """

        self.check_gradient_sync()
        locals_ = [p.to_local() for p in parameters]  # type: ignore[attr-defined]
        sizes = [t.numel() for t in locals_]
        m = len(losses)
        rows: Tensor = locals_[0].new_zeros(m, sum(sizes))
        user_setting = [(group, group.reshard_after_backward) for group in self._groups]
        for group, _ in user_setting:
            group.reshard_after_backward = False
        try:
            for task, loss in enumerate(losses):
                for parameter in parameters:
                    parameter.grad = None
                if task == m - 1:
                    for group, setting in user_setting:
                        group.reshard_after_backward = setting
                torch.autograd.backward(loss, retain_graph=task < m - 1)
                chunks = torch.split(rows[task], sizes)
                for chunk, parameter in zip(chunks, parameters, strict=True):
                    if parameter.grad is not None:
                        chunk.copy_(parameter.grad.to_local().reshape(-1))  # type: ignore[attr-defined]
        finally:
            for group, setting in user_setting:
                group.reshard_after_backward = setting
            for parameter in parameters:
                parameter.grad = None
        return rows


def stash_gradients(parameters: Sequence[Tensor]) -> list[Tensor | None]:
    """The parameters' current ``.grad`` (cleared), to be added back by :func:`write_sharded`."""

    stashed = [p.grad for p in parameters]
    for parameter in parameters:
        parameter.grad = None
    return stashed


def write_sharded(
    parameters: Sequence[Tensor], vector: Tensor, stashed: Sequence[Tensor | None]
) -> None:
    """
    Sets each parameter's sharded ``.grad`` to its piece of ``vector`` (this rank's shards,
    flattened in order) plus the gradient it held before the step.
    """

    locals_ = [p.to_local() for p in parameters]  # type: ignore[attr-defined]
    pieces = torch.split(vector, [t.numel() for t in locals_])
    for parameter, local, piece, before in zip(parameters, locals_, pieces, stashed, strict=True):
        gradient = DTensor.from_local(
            piece.view_as(local).to(parameter.dtype),
            parameter.device_mesh,  # type: ignore[attr-defined]
            parameter.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=parameter.shape,
            stride=parameter.stride(),
        )
        parameter.grad = gradient if before is None else before + gradient


def local_size(parameters: Sequence[Tensor]) -> int:
    """The number of values of this rank's shards of ``parameters``."""

    return sum(p.to_local().numel() for p in parameters)  # type: ignore[attr-defined]
