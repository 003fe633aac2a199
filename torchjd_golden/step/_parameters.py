"""
The parameters a step updates: the module's, listed once, and which of them are shared (given,
or found at each step in the graph of the features, as torchjd's ``mtl_backward`` finds them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from torch import Tensor, nn

SharedParameters = nn.Module | Iterable[Tensor] | Literal["features"] | None


class StepParameters:
    """
    The parameters of a module (``all``, listed when the step is made: between a forward and its
    backward, an FSDP2 root lists its unsharded ones) and the shared ones among them: ``shared``
    holds their ids, ``None`` when every parameter is shared; with ``found``
    (``shared="features"``), they are found in each step's graph.
    """

    def __init__(self, parameters: list[Tensor], shared: SharedParameters):
        self.all = parameters
        self.shared: set[int] | None = None
        self.found = isinstance(shared, str)
        if isinstance(shared, str):
            if shared != "features":
                raise ValueError(
                    "Parameter `shared` must be a module, parameters of `module`, 'features' or "
                    f"None. Found {shared!r}."
                )
            return
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

    @property
    def everything_shared(self) -> bool:
        """Whether every parameter is shared (torchjd's ``backward``: no task has its own)."""
        return self.shared is None and not self.found

    def is_shared(self, parameter: Tensor) -> bool:
        return self.everything_shared or (self.shared is not None and id(parameter) in self.shared)

    def trainable(self) -> list[Tensor]:
        return [p for p in self.all if p.requires_grad]

    def split(
        self, losses: Sequence[Tensor] = (), features: Sequence[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        The trainable parameters: the shared ones, and the others (the tasks' own heads). Found in
        the graph of ``losses`` and ``features``: the parameters the features depend on (all those
        the losses reach, without features) and those the losses reach through the heads; the
        parameters no loss reaches get no gradient. At the end of a found step (no ``losses``):
        those that received a Jacobian (``.jac``), and the others.
        """

        trainable = self.trainable()
        if self.found and not losses:
            shared = [p for p in trainable if hasattr(p, "jac")]
            return shared, [p for p in trainable if not hasattr(p, "jac")]
        if self.found:
            reached = graph_leaves(features if features is not None else losses)
            heads = graph_leaves(losses, stops=features or ()) if features is not None else {}
            shared = [p for p in trainable if id(p) in reached]
            return shared, [p for p in trainable if id(p) in heads and id(p) not in reached]
        shared = [p for p in trainable if self.is_shared(p)]
        return shared, [p for p in trainable if not self.is_shared(p)]


def graph_leaves(roots: Sequence[Tensor], stops: Sequence[Tensor] = ()) -> dict[int, Tensor]:
    """
    The leaf tensors that require grad in the graph of ``roots`` (by id, in order of discovery),
    without going past the tensors ``stops``: a walk of the graph, no backward pass.
    """

    leaves: dict[int, Tensor] = {}
    seen: set[object] = {t.grad_fn for t in stops if t.grad_fn is not None}
    stack = [root.grad_fn for root in reversed(roots)]
    for root in roots:
        if root.grad_fn is None and root.requires_grad:  # a leaf itself
            leaves.setdefault(id(root), root)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in reversed(node.next_functions))
    return leaves
