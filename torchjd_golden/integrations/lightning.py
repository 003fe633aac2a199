"""
PyTorch Lightning integration: a ``LightningModule`` whose ``training_step`` returns per-task
losses trains with any aggregator, under Lightning's automatic optimisation (``pip install
'torchjd-golden[lightning]'``). ``import torchjd_golden`` does not import Lightning; this module
does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from ..monitoring._conflict_monitor import ConflictMonitor
from ..monitoring._recorder import DiagnosticsRecorder
from ..step._sharded import GramianSource
from ..step._task_step import JacobianStep, SharedModules, TaskLosses

__all__ = ["MultiTaskModule", "TaskLosses"]

_STATES_BY_RANK = "aggregator_states_by_rank"  # the checkpoint's entry under several processes


class MultiTaskModule(LightningModule):
    r"""
    A :class:`~lightning.pytorch.LightningModule` trained by Jacobian descent: its
    ``training_step`` returns the losses by task name (a mapping), a vector of losses (the tasks
    are then ``task_0``, ``task_1``, ...), or :class:`TaskLosses` with the shared features, and
    Lightning's automatic optimisation does the rest:

    - the step is the engine's (:class:`~torchjd_golden.JacobianDescent`, exact, with the shared
      parameters named by ``shared``, or found from the features as torchjd's ``mtl_backward``
      finds them, every parameter without features): each micro-batch adds its Jacobian to the
      step's; with ``accumulate_grad_batches=k`` Lightning divides the losses by :math:`k`, so
      the step holds the mean Jacobian of the :math:`k` micro-batches;
    - once per optimizer step, before Lightning's gradient clipping and the step, the aggregator
      combines it, told the task names (and, for the adaptive Golden Pendulum, the losses);
    - under ``precision="16-mixed"`` the aggregator sees the Jacobian without the loss scale and
      hands back the scaled result, as :func:`~torchjd_golden.with_grad_scaler` does, so the
      scaler's unscaling, overflow check and skipped steps work as usual; ``"bf16-mixed"`` needs
      nothing;
    - the aggregator is a submodule, so its state is in the module's ``state_dict`` and in
      Lightning's checkpoints: a run resumed with ``trainer.fit(..., ckpt_path=...)`` continues
      bit-identically;
    - under ``strategy="ddp"`` the step is that of one process on the global batch (the engine
      runs on the ``DistributedDataParallel`` module Lightning made; accumulation, clipping and
      mixed precision as on one process). ExcessMTL's and GCond's state then covers this rank's
      columns only: every rank's state is saved in the checkpoint (``aggregator_states_by_rank``)
      and each rank resumes from its own, on the same number of processes;
    - under Lightning's FSDP2 path (``ModelParallelStrategy``, ``fully_shard`` called in
      ``configure_model``) the shared parameters must be named (``shared="trunk"``): the graph
      of an FSDP2 model holds its unsharded parameters, which cannot be mapped back to the
      sharded ones the step updates;
    - the weights of each step are logged by task name through ``self.log``
      (``task_weights/weight/{task}``, ``task_weights/balance_ratio``, and Golden Pendulum's
      ``task_weights/alpha/{task}``; none for GCond, whose update has no weights), and with
      ``diagnostics`` the diagnostics engine's statistics (``diagnostics/conflict_ratio``,
      ``norm_ratio``, ``balance_ratio``, ...).

    .. code-block:: python

        class MultiTask(MultiTaskModule):
            def __init__(self, aggregator: str = "gcond"):
                super().__init__(aggregator)  # chosen by name, e.g. from the hyper-parameters
                self.save_hyperparameters()
                self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
                self.heads = nn.ModuleDict({name: nn.Linear(32, 1) for name in ("a", "b")})

            def training_step(self, batch, batch_idx):
                inputs, targets = batch
                features = self.trunk(inputs)
                losses = {name: mse(head(features)[:, 0], targets[:, k])
                          for k, (name, head) in enumerate(self.heads.items())}
                return TaskLosses(losses, features=features)  # or just `losses`

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-3)

    A subclass that overrides :meth:`backward`, :meth:`optimizer_step`,
    :meth:`on_save_checkpoint` or :meth:`on_load_checkpoint` must call this class's versions;
    manual optimisation is not supported (use torchjd directly there).

    :param aggregator: The aggregator, or a name or config for
        :func:`~torchjd_golden.aggregator_from_config` (``"gcond"``, ``{"name": "upgrad"}``).
    :param diagnostics: ``True`` to attach the diagnostics engine
        (:class:`~torchjd_golden.ConflictMonitor`) to the aggregator: it records each step's
        Gramian (the one the aggregation computed: no extra backward pass); or a recorder to
        attach the same way: a :class:`~torchjd_golden.ConflictMonitor` of your own, or any
        object with a ``record(gramian, weights=None, *, tasks=None)`` method.
    :param log_weights: Whether to log the weights through ``self.log``.
    :param gramian_from: The engine's source of the weights (also a key of a mapping
        ``aggregator`` config): ``"parameters"`` (exact) or
        ``"features"`` (the Gramian of the gradients with respect to the features of
        :class:`TaskLosses`, then one ordinary backward pass; Gramian weightings only).
    :param shared: The shared parameters: ``None`` (found at each step from the features, or
        every parameter the losses reach without features), the name of a submodule
        (``"trunk"``) or a sequence of names, a submodule, or a callable that takes the module
        and returns a submodule or parameters. Resolved at the first training step, after
        ``configure_model``;
        the other trained parameters (the heads) get their own task's gradient. Needed under
        FSDP2.
    """

    def __init__(
        self,
        aggregator: object = "upgrad",
        *,
        diagnostics: bool | DiagnosticsRecorder = False,
        log_weights: bool = True,
        gramian_from: GramianSource = "parameters",
        shared: SharedModules = None,
    ) -> None:
        super().__init__()
        self._jacobian_step = JacobianStep(aggregator, diagnostics, gramian_from, shared)
        self.aggregator = self._jacobian_step.aggregator  # a submodule: its state is checkpointed
        self.log_weights = log_weights
        # Under ModelParallelStrategy the model's state goes through torch.distributed.checkpoint,
        # which maps every key to an attribute (GCond's checkpoint form has none) and keeps one
        # copy of a tensor that is not sharded: the aggregator's state travels per rank instead.
        self.register_state_dict_post_hook(_without_aggregator_state)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_post_hook(_aggregator_state_not_missing)  # type: ignore[no-untyped-call]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_takes_task_losses", False):
            cls.training_step = _taking_task_losses(step)  # type: ignore[method-assign]

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """
        What ``DistributedDataParallel`` leaves alone: the aggregator's state, which it would
        otherwise overwrite with rank 0's at wrapping and at each forward pass (each rank keeps
        its own, for its own columns under ExcessMTL and GCond), and the names set as usual.
        """

        names = [f"aggregator.{name}" for name, _ in self.aggregator.named_buffers()]
        return [*self.__dict__.get("_ddp_ignored", ()), *names]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: list[str]) -> None:
        self.__dict__["_ddp_ignored"] = list(names)

    @property
    def diagnostics(self) -> DiagnosticsRecorder | ConflictMonitor | None:
        """The diagnostics engine (``diagnostics=True``) or the recorder given, or ``None``."""
        return self._jacobian_step.recorder

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Adds the Jacobian of the (scaled) per-task losses to the step's."""

        self._jacobian_step.backward(loss, self._trained_module())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """
        Under several processes or ``ModelParallelStrategy``, adds every rank's aggregator state
        (a collective call).
        """

        if _world_size() > 1 or self._sharded_by_strategy():
            mine = {key: value.cpu() for key, value in self.aggregator.state_dict().items()}
            states: list[Any] = [mine]
            if _world_size() > 1:
                states = [None] * _world_size()
                dist.all_gather_object(states, mine)
            checkpoint[_STATES_BY_RANK] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """
        Puts this rank's aggregator state in the ``state_dict`` about to be loaded, or, under
        ``ModelParallelStrategy`` (which loaded the model already), loads it.
        """

        states = checkpoint.get(_STATES_BY_RANK)
        if states is None:
            return
        if len(states) != _world_size():
            raise ValueError(
                f"The checkpoint holds the aggregator states of {len(states)} processes; this run "
                f"has {_world_size()}: the aggregator's per-rank state resumes on the same number."
            )
        mine = states[dist.get_rank() if _world_size() > 1 else 0]
        model_state = checkpoint.get("state_dict")
        if model_state is None:  # ModelParallelStrategy loaded the model before this hook
            self.aggregator.load_state_dict(mine)
            return
        for key in [key for key in model_state if key.startswith("aggregator.")]:
            del model_state[key]
        model_state.update({f"aggregator.{key}": value for key, value in mine.items()})

    def _trained_module(self) -> nn.Module:
        """
        The module the strategy runs: the ``DistributedDataParallel`` one under ``"ddp"``, this
        one (``fully_shard``-ed in ``configure_model``) under ``ModelParallelStrategy``.
        """

        trainer = self._trainer
        model = None if trainer is None else trainer.strategy.model
        return model if isinstance(model, nn.Module) else self

    def _sharded_by_strategy(self) -> bool:
        """Whether the trainer runs ``ModelParallelStrategy`` (its checkpoints: see __init__)."""

        trainer = self._trainer
        return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Runs the step with a closure that aggregates the Jacobians after the last backward."""

        def closure() -> Any:
            result = optimizer_closure() if optimizer_closure is not None else None
            self._resolve()
            return result

        optimizer.step(closure=closure)

    def _resolve(self) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self._jacobian_step.resolve(scaler)
        if not self._jacobian_step.aggregated:
            return
        if self.log_weights:  # none for an aggregator without weights (GCond)
            scalars = self._jacobian_step.weight_scalars()
            self.log_dict({f"task_weights/{k}": v for k, v in scalars.items()}, on_step=True)
        scalars_of = getattr(self.diagnostics, "scalars", None)
        if callable(scalars_of):
            self.log_dict({f"diagnostics/{k}": v for k, v in scalars_of().items()}, on_step=True)


def _taking_task_losses(training_step: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a ``training_step`` so that Lightning receives the losses as one vector."""

    @functools.wraps(training_step)
    def wrapped(self: MultiTaskModule, *args: Any, **kwargs: Any) -> Tensor | None:
        self._jacobian_step.bind(self._trained_module())
        output = training_step(self, *args, **kwargs)
        return None if output is None else self._jacobian_step.take(output)

    wrapped._takes_task_losses = True  # type: ignore[attr-defined]
    return wrapped


def _without_aggregator_state(
    module: MultiTaskModule, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Under ``ModelParallelStrategy``, the model's state without the aggregator's."""

    if module._sharded_by_strategy():
        for key in [key for key in state_dict if key.startswith(f"{prefix}aggregator.")]:
            del state_dict[key]


def _aggregator_state_not_missing(module: MultiTaskModule, incompatible: Any) -> None:
    """Under ``ModelParallelStrategy``, the aggregator's state is loaded from its own entry."""

    if module._sharded_by_strategy():
        missing = incompatible.missing_keys
        missing[:] = [key for key in missing if not key.startswith("aggregator.")]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
