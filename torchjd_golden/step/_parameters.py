"""The parameters a step updates: the module's, listed once, and which of them are shared."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


class StepParameters:
    """
    The parameters of a module (``all``, listed when the step is made: between a forward and its
    backward, an FSDP2 root lists its unsharded ones) and the shared ones among them (``shared``:
    their ids, ``None`` when every parameter is shared).
    """

    def __init__(self, parameters: list[Tensor], shared: nn.Module | Iterable[Tensor] | None):
        self.all = parameters
        self.shared: set[int] | None = None
        if shared is None:
            return
        tensors = list(shared.parameters() if isinstance(shared, nn.Module) else shared)
        known = {id(p) for p in parameters}
        for tensor in tensors:
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    "Parameter `shared` must be a module or parameters of `module`. Found "
                    f"{type(tensor).__name__}."
                )
            if id(tensor) not in known:
                raise ValueError(
                    "Parameter `shared` holds a tensor that is not a parameter of `module` (for "
                    "FSDP2, list them after `fully_shard` and before the first forward)."
                )
        self.shared = {id(t) for t in tensors}

    def is_shared(self, parameter: Tensor) -> bool:
        return self.shared is None or id(parameter) in self.shared

    def trainable(self) -> list[Tensor]:
        return [p for p in self.all if p.requires_grad]

    def split(self) -> tuple[list[Tensor], list[Tensor]]:
        """The trainable parameters: the shared ones, and the others (the tasks' own heads)."""

        trainable = self.trainable()
        shared = [p for p in trainable if self.is_shared(p)]
        return shared, [p for p in trainable if not self.is_shared(p)]
