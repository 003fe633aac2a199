r"""
:class:`JacobianDescent`: one training step of Jacobian descent, wherever the model runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.nn.parallel import DistributedDataParallel
from torchjd.aggregation import Aggregator
from torchjd.autojac import jac_to_grad

from ..aggregation._gramian import compute_gramian
from ..aggregation._tasks import set_step_inputs
from ._amp import with_grad_scaler
from ._collectives import ColumnBlocks, RankGroup
from ._features import all_reduced_feature_gramian, feature_gradients, weighted_backward
from ._fsdp import FullyShardedRows, is_fully_sharded, stash_gradients, write_sharded
from ._jacobian import (
    accumulate_jacobians,
    discard_jacobians,
    flat_jacobian,
    is_compiled,
    write_gradients,
)
from ._losses import TaskLossesInput, detached_vector, shared_features, task_losses
from ._parameters import SharedParameters, StepParameters
from ._sharded import (
    GramianSource,
    aggregate_block,
    call_capturing_weights,
    check_gramian_source,
    column_split,
    give_mean_step_inputs,
    gramian_weighting_of,
)

Layout = Literal["local", "ddp", "fsdp"]


class JacobianDescent:
    r"""
    Turns per-task losses into ``.grad`` on every trainable parameter of ``module`` by Jacobian
    descent, and returns the task weights: ``weights = jd.backward(losses, features=features)``,
    then ``optimizer.step()``. The same code runs on one process, on a
    :class:`~torch.nn.parallel.DistributedDataParallel` module and on an FSDP2 (``fully_shard``)
    module, compiled or not; make the ``JacobianDescent`` after wrapping the module and before its
    first forward.

    The parameters of ``shared`` (all of ``module``'s when ``None``) are updated by the
    aggregation of their Jacobian, :math:`w^\top J`; every other trainable parameter receives the
    sum of its rows, i.e. the gradient of its own task's loss, as torchjd's ``mtl_backward``
    gives the task-specific heads.

    **Where the weights come from** (``gramian_from``):

    - ``"parameters"`` (exact, every aggregator of this package and of torchjd): the Jacobian of
      the losses with respect to the shared parameters. On one process this is torchjd's
      ``backward`` (or ``mtl_backward`` given ``features``) and ``jac_to_grad``; with
      ``per_task`` it is one backward pass per task, for the graphs that ``torch.vmap`` cannot
      go through (compiled modules, random operations under activation checkpointing). Under
      DDP every rank aggregates the whole batch's Jacobian :math:`\bar J = \frac1R \sum_r J_r`:
      a reduce-scatter gives each rank a block of its columns, the weights come from
      :math:`m \times m` statistics all-reduced over the blocks, and an all-gather assembles the
      update. Under FSDP2 each task's backward pass is reduce-scattered by FSDP into this rank's
      shard, and the same statistics give every rank the same weights for its shard. The
      aggregators whose statistics are not sums over columns run on the gathered Jacobian.
    - ``"features"`` (fast, Gramian weightings only): the weights of the Gramian of the tasks'
      gradients with respect to ``features`` (the trunk's output, a sum over samples, all-reduced
      over the ranks as the Gramian of the global-mean losses), then one ordinary backward pass
      that gives the trunk exactly :math:`w^\top J` for those weights. It costs about one plain
      backward pass and :math:`m` passes through the heads, where the exact step costs :math:`m`
      backward passes; only the weights are approximate.

    **Micro-batches.** :meth:`backward` is :meth:`accumulate` followed by :meth:`resolve`. To
    accumulate several micro-batches into one step, call :meth:`accumulate` for each (with its
    losses divided by the number of micro-batches) and :meth:`resolve` once: with
    ``"parameters"`` the Jacobians are added up and aggregated once (GCond's
    accumulate-then-resolve); with ``"features"`` each micro-batch is weighted by its own feature
    Gramian as it comes (its graph is freed at once), so a stateful weighting takes one step per
    micro-batch.

    **What the aggregator is told.** The task names (the keys of a mapping of losses; a vector's
    tasks are known by position) and, for an aggregator that reads them (the adaptive Golden
    Pendulum), the losses of the step, averaged over the ranks. Under a
    :class:`~torch.amp.GradScaler` (``scaler``), pass the scaled losses: the aggregator sees the
    Jacobian (or feature Gramian) without the scale, as
    :func:`~torchjd_golden.with_grad_scaler` arranges, and a step whose gradients overflow
    leaves the aggregator's state untouched and gives non-finite gradients that the scaler skips.

    :param module: The model: a module, a ``DistributedDataParallel`` module or an FSDP2 module.
    :param aggregator: Any torchjd aggregator, ours included.
    :param shared: The shared parameters: a module, an iterable of parameters, ``None`` (every
        parameter of ``module``), or ``"features"`` (found at each step as ``mtl_backward`` finds
        them, unreached parameters getting no gradient: what the trainer integrations use).
    :param gramian_from: ``"parameters"`` or ``"features"``.
    :param scaler: The ``GradScaler`` that scales the losses, or ``None``.
    :param per_task: Whether the exact Jacobian is computed by one backward pass per task
        (``True``) or by torchjd's batched backward (``False``); ``None`` chooses: per task for
        compiled and FSDP2 modules, batched otherwise, switching to per task for good if the
        first batched pass fails (as it does on random operations under activation
        checkpointing).
    """

    def __init__(
        self,
        module: nn.Module,
        aggregator: Aggregator,
        *,
        shared: SharedParameters = None,
        gramian_from: GramianSource = "parameters",
        scaler: GradScaler | None = None,
        per_task: bool | None = None,
    ) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                "Parameter `aggregator` must be a torchjd Aggregator (for instance GoldenPendulum()"
                " "
                f"or torchjd.aggregation.UPGrad()). Found {type(aggregator).__name__}."
            )
        check_gramian_source(aggregator, gramian_from)
        if per_task is not None and not isinstance(per_task, bool):
            raise ValueError(f"Parameter `per_task` must be a bool or None. Found {per_task!r}.")
        self.module = module
        self.aggregator = aggregator
        self.gramian_from: GramianSource = gramian_from
        self.scaler = scaler
        inner = module.module if isinstance(module, DistributedDataParallel) else module
        # Listed now: between a forward and its backward, an FSDP2 root lists its unsharded ones.
        self._parameters = StepParameters(list(inner.parameters()), shared)
        self._ranks: RankGroup | None = None
        self._fsdp: FullyShardedRows | None = None
        self._layout: Layout = "local"
        if isinstance(module, DistributedDataParallel):
            self._layout, self._ranks = "ddp", RankGroup(module.process_group)
            if gramian_from == "parameters":
                # The exact step differentiates with torch.autograd.grad, which DDP's reducer never
                # sees: it must not expect a backward pass after each forward.
                module.require_backward_grad_sync = False
        elif is_fully_sharded(module):
            if self._parameters.found:  # its graph holds FSDP2's unsharded parameters, not these
                raise ValueError(
                    "FSDP2 needs the shared parameters named, not `shared='features'`."
                )
            self._layout = "fsdp"
            self._fsdp = FullyShardedRows(module, self._parameters.all)
            self._ranks = self._fsdp.ranks
        self.per_task = per_task
        if per_task is None and (self._layout == "fsdp" or is_compiled(module)):
            self.per_task = True
        self._batched_proven = per_task is False
        self._scaled: tuple[GradScaler, Aggregator] | None = None
        self._clear_step()

    @property
    def layout(self) -> Layout:
        """Where the model runs: ``"local"`` (one process), ``"ddp"`` or ``"fsdp"``."""
        return self._layout

    def backward(
        self, losses: TaskLossesInput, *, features: Tensor | Sequence[Tensor] | None = None
    ) -> Tensor | None:
        """
        Fills the ``.grad`` of every trainable parameter (adding to what they hold) from the
        per-task ``losses`` (a mapping from task name to scalar loss, a vector or a sequence of
        scalar losses) and returns the weights (``None`` for an aggregator without). ``features``
        (the shared representation every task uses) is required with ``gramian_from="features"``;
        with ``"parameters"`` it lets torchjd's ``mtl_backward`` differentiate the trunk once.
        """

        self.accumulate(losses, features=features)
        return self.resolve()

    def accumulate(
        self, losses: TaskLossesInput, *, features: Tensor | Sequence[Tensor] | None = None
    ) -> None:
        """Adds one micro-batch to the step (see :meth:`backward` for the arguments)."""

        names, values = task_losses(losses)
        if self._step.micro_batches and (names != self._step.tasks or len(values) != self._step.m):
            raise ValueError(
                "The tasks changed within one step, from "
                f"{list(self._step.tasks) if self._step.tasks else self._step.m} to "
                f"{list(names) if names else len(values)}: every micro-batch of a step must give "
                "the same tasks."
            )
        feature_list = shared_features(features)
        self._step.tasks, self._step.m = names, len(values)
        if self.gramian_from == "features":
            if feature_list is None:
                raise ValueError(
                    "`gramian_from='features'` needs the shared features: call "
                    "`backward(losses, features=features)` with the trunk's output."
                )
            self._features_step(values, feature_list)
        elif self._layout == "fsdp":
            self._accumulate_sharded_rows(values)
        else:
            self._accumulate_jacobians(values, feature_list)
        loss_vector = detached_vector(values)
        self._step.loss_sum = (
            loss_vector if self._step.loss_sum is None else self._step.loss_sum + loss_vector
        )
        self._step.micro_batches += 1

    def resolve(self) -> Tensor | None:
        """
        Ends the step: aggregates what the micro-batches accumulated into ``.grad`` and returns
        the weights (with ``"features"``: the mean of the micro-batches' weights).
        """

        if not self._step.micro_batches:
            raise RuntimeError("`resolve` needs a micro-batch: call `accumulate` first.")
        try:
            if self.gramian_from == "features":
                weights = self._step.weights_sum
                return None if weights is None else weights / self._step.micro_batches
            if self._layout == "fsdp":
                return self._resolve_sharded_rows()
            return self._resolve_jacobians()
        finally:
            self._clear_step()

    # -- the exact step on one process and under DDP: torchjd's .jac fields ----------------------

    def _accumulate_jacobians(self, losses: list[Tensor], features: list[Tensor] | None) -> None:
        shared, others = self._parameters.split(losses, features)
        if self._parameters.everything_shared:  # every parameter, those after the features too
            features = None
        if self.per_task is None and not self._batched_proven:
            self._probe_batched(losses, shared, others, features)
            return
        accumulate_jacobians(
            losses, shared, others, features=features, per_task=bool(self.per_task)
        )

    def _probe_batched(
        self,
        losses: list[Tensor],
        shared: list[Tensor],
        others: list[Tensor],
        features: list[Tensor] | None,
    ) -> None:
        """The first batched pass, with the graph kept: if vmap cannot run it, per task for good."""

        kept = [None if p.grad is None else p.grad.clone() for p in others]
        had_jacobian = [hasattr(p, "jac") for p in shared]
        try:
            accumulate_jacobians(
                losses, shared, others, features=features, per_task=False, retain_graph=True
            )
        except RuntimeError:
            for parameter, gradient in zip(others, kept, strict=True):
                parameter.grad = gradient
            discard_jacobians([p for p, had in zip(shared, had_jacobian, strict=True) if not had])
            self.per_task = True
            accumulate_jacobians(losses, shared, others, features=features, per_task=True)
            return
        self._batched_proven = True

    def _resolve_jacobians(self) -> Tensor | None:
        shared, others = self._parameters.split()
        shared = [p for p in shared if hasattr(p, "jac")]
        if self._layout == "local":
            set_step_inputs(self.aggregator, self._step.tasks, self._step.loss_sum)
            return jac_to_grad(shared, self._aggregator_in_use()) if shared else None
        assert self._ranks is not None
        self._ranks.average_gradients(others)  # the heads' own, as DDP would
        if not shared:
            return None
        jacobian = flat_jacobian(shared)
        aggregator = self._aggregator_in_use()
        if column_split(aggregator) == "whole":
            self._ranks.all_reduce(jacobian).div_(self._ranks.size)
            give_mean_step_inputs(
                self._ranks, self.aggregator, self._step.tasks, self._step.loss_sum
            )
            update, weights = call_capturing_weights(aggregator, jacobian)
        else:
            blocks = ColumnBlocks(self._ranks, jacobian.shape[1])
            block = blocks.reduce_scatter_mean(jacobian)
            del jacobian
            update_block, weights = aggregate_block(
                aggregator, block, self._ranks, inputs_of=self.aggregator, tasks=self._step.tasks,
                losses=self._step.loss_sum,
            )  # fmt: skip
            update = blocks.all_gather(update_block)
        write_gradients(shared, update)
        if isinstance(self.module, DistributedDataParallel):
            # Without a backward pass through its reducer, DDP would stop broadcasting rank 0's
            # buffers (batch-norm statistics) at the next forwards: it is asked to again.
            self.module.require_forward_param_sync = True
        return weights

    # -- the exact step under FSDP2: one reduce-scattered backward pass per task -----------------

    def _accumulate_sharded_rows(self, losses: list[Tensor]) -> None:
        assert self._fsdp is not None
        trainable = self._parameters.trainable()
        if self._step.stashed is None:
            self._step.stashed = stash_gradients(trainable)
            self._step.parameters = trainable
        elif trainable != self._step.parameters:
            raise ValueError("The trainable parameters changed within one step.")
        rows = self._fsdp.rows(losses, trainable)
        self._step.rows = rows if self._step.rows is None else self._step.rows.add_(rows)

    def _resolve_sharded_rows(self) -> Tensor | None:
        assert self._fsdp is not None
        assert self._step.rows is not None
        assert self._step.stashed is not None
        parameters, rows = self._step.parameters, self._step.rows
        local_sizes = [p.to_local().numel() for p in parameters]  # type: ignore[attr-defined]
        is_shared = torch.cat(
            [
                torch.full((size,), self._parameters.is_shared(p), device=rows.device)
                for p, size in zip(parameters, local_sizes, strict=True)
            ]
        )
        update = rows.sum(dim=0)
        weights = None
        if bool(is_shared.any()):
            update_block, weights = aggregate_block(
                self._aggregator_in_use(), rows[:, is_shared], self._fsdp.ranks,
                inputs_of=self.aggregator, tasks=self._step.tasks, losses=self._step.loss_sum,
            )  # fmt: skip
            update[is_shared] = update_block.to(update.dtype)
        write_sharded(parameters, update, self._step.stashed)
        return weights

    # -- the fast step: the feature Gramian, then one ordinary backward pass ---------------------

    def _features_step(self, losses: list[Tensor], features: list[Tensor]) -> None:
        try:
            rows = feature_gradients(losses, features, batched=self.per_task is not True)
        except RuntimeError:  # torch.vmap cannot go through these heads: one pass per task
            if self.per_task is not None:
                raise
            self.per_task, rows = True, feature_gradients(losses, features, batched=False)
        gramian = compute_gramian(rows)
        loss_vector = detached_vector(losses)
        if self._ranks is not None:
            gramian, loss_vector = all_reduced_feature_gramian(self._ranks, gramian, loss_vector)
        set_step_inputs(self.aggregator, self._step.tasks, loss_vector)
        weighting = gramian_weighting_of(self._aggregator_in_use())
        assert weighting is not None
        weights = weighting(gramian)
        everything_shared = self._parameters.everything_shared
        weighted_backward(
            losses, weights, None if everything_shared else features, None if everything_shared
            else rows,
        )  # fmt: skip
        self._step.weights_sum = (
            weights if self._step.weights_sum is None else self._step.weights_sum + weights
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _aggregator_in_use(self) -> Aggregator:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return self.aggregator
        if self._scaled is None or self._scaled[0] is not scaler:
            self._scaled = (scaler, with_grad_scaler(self.aggregator, scaler))
        return self._scaled[1]

    def _clear_step(self) -> None:
        self._step = _Step()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(aggregator={self.aggregator!r}, "
            f"gramian_from={self.gramian_from!r}, layout={self._layout!r})"
        )


@dataclass
class _Step:
    """What the micro-batches of the current step have accumulated."""

    tasks: tuple[Hashable, ...] | None = None
    m: int = 0
    micro_batches: int = 0
    loss_sum: Tensor | None = None  # for the aggregators that read the losses
    weights_sum: Tensor | None = None  # "features": the micro-batches' weights
    rows: Tensor | None = None  # FSDP2: the Jacobian's rows on this rank's shards
    stashed: list[Tensor | None] | None = None  # FSDP2: the gradients held before the step
    parameters: list[Tensor] = field(default_factory=list)  # FSDP2: the step's trainable ones
