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

from lightning.pytorch import LightningModule
from torch import Tensor

from ..monitoring._conflict_monitor import ConflictMonitor
from ..monitoring._recorder import DiagnosticsRecorder
from ..step._task_step import JacobianStep, TaskLosses

__all__ = ["MultiTaskModule", "TaskLosses"]


class MultiTaskModule(LightningModule):
    r"""
    A :class:`~lightning.pytorch.LightningModule` trained by Jacobian descent: its
    ``training_step`` returns the losses by task name (a mapping), a vector of losses (the tasks
    are then ``task_0``, ``task_1``, ...), or :class:`TaskLosses` with the shared features, and
    Lightning's automatic optimisation does the rest:

    - each micro-batch runs torchjd's ``backward`` (or ``mtl_backward`` given features), which
      adds to the ``.jac`` fields; with ``accumulate_grad_batches=k`` Lightning divides the
      losses by :math:`k`, so the fields hold the mean Jacobian of the :math:`k` micro-batches;
    - once per optimizer step, before Lightning's gradient clipping and the step, ``jac_to_grad``
      aggregates them with the aggregator, which is told the task names (and, for the adaptive
      Golden Pendulum, the losses);
    - under ``precision="16-mixed"`` the aggregator sees the Jacobian without the loss scale and
      hands back the scaled result, as :func:`~torchjd_golden.with_grad_scaler` does, so the
      scaler's unscaling, overflow check and skipped steps work as usual; ``"bf16-mixed"`` needs
      nothing;
    - the aggregator is a submodule, so its state is in the module's ``state_dict`` and in
      Lightning's checkpoints: a run resumed with ``trainer.fit(..., ckpt_path=...)`` continues
      bit-identically;
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

    A subclass that overrides :meth:`backward` or :meth:`optimizer_step` must call this class's
    versions; manual optimisation is not supported (use torchjd directly there).

    :param aggregator: The aggregator, or a name or config for
        :func:`~torchjd_golden.aggregator_from_config` (``"gcond"``, ``{"name": "upgrad"}``).
    :param diagnostics: ``True`` to attach the diagnostics engine
        (:class:`~torchjd_golden.ConflictMonitor`) to the aggregator: it records each step's
        Gramian (the one the aggregation computed: no extra backward pass); or a recorder to
        attach the same way: a :class:`~torchjd_golden.ConflictMonitor` of your own, or any
        object with a ``record(gramian, weights=None, *, tasks=None)`` method.
    :param log_weights: Whether to log the weights through ``self.log``.
    """

    def __init__(
        self,
        aggregator: object = "upgrad",
        *,
        diagnostics: bool | DiagnosticsRecorder = False,
        log_weights: bool = True,
    ) -> None:
        super().__init__()
        self._jacobian_step = JacobianStep(aggregator, diagnostics)
        self.aggregator = self._jacobian_step.aggregator  # a submodule: its state is checkpointed
        self.log_weights = log_weights

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_takes_task_losses", False):
            cls.training_step = _taking_task_losses(step)  # type: ignore[method-assign]

    @property
    def diagnostics(self) -> DiagnosticsRecorder | ConflictMonitor | None:
        """The diagnostics engine (``diagnostics=True``) or the recorder given, or ``None``."""
        return self._jacobian_step.recorder

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Adds the Jacobian of the (scaled) per-task losses to the ``.jac`` fields."""

        self._jacobian_step.backward(loss)

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
        self._jacobian_step.resolve(self.parameters(), scaler)
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
        output = training_step(self, *args, **kwargs)
        return None if output is None else self._jacobian_step.take(output)

    wrapped._takes_task_losses = True  # type: ignore[attr-defined]
    return wrapped
