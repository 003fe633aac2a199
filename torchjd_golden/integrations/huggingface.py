"""
Hugging Face Transformers integration: a ``Trainer`` for models whose forward returns per-task
losses (``pip install 'torchjd-golden[huggingface]'``). ``import torchjd_golden`` does not import
Transformers; this module does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..monitoring._conflict_monitor import ConflictMonitor
from ..monitoring._recorder import DiagnosticsRecorder
from ..step._task_step import JacobianStep, TaskLosses, split_task_losses

__all__ = ["AGGREGATOR_STATE_NAME", "MultiTaskTrainer", "TaskLosses"]

AGGREGATOR_STATE_NAME = "aggregator.pt"
"""The file of a checkpoint folder that holds the aggregator's ``state_dict``."""


class MultiTaskTrainer(Trainer):
    r"""
    A :class:`transformers.Trainer` that trains by Jacobian descent a model whose forward returns
    per-task losses: a mapping from task name to loss, a vector of losses (the tasks are then
    ``task_0``, ``task_1``, ...), :class:`TaskLosses` with the shared features, or a mapping (such
    as a ``ModelOutput``) with a ``losses`` entry and maybe a ``features`` entry.

    - Each micro-batch runs torchjd's ``backward`` (or ``mtl_backward`` given features) on the
      losses divided by the number of micro-batches, which adds to the ``.jac`` fields, so that
      with ``gradient_accumulation_steps=k`` they hold the mean Jacobian of the step.
    - After the last micro-batch of a step, ``jac_to_grad`` aggregates them once with the
      aggregator (told the task names, and the losses for the adaptive Golden Pendulum); the
      Trainer then clips (``max_grad_norm``) and steps as usual.
    - With ``fp16=True`` the losses are scaled by the accelerator's ``GradScaler`` and the
      aggregator sees the Jacobian without the scale, as
      :func:`~torchjd_golden.with_grad_scaler` does; ``bf16=True`` needs nothing.
    - The aggregator's ``state_dict`` is saved as ``aggregator.pt`` in every checkpoint folder
      and loaded by ``train(resume_from_checkpoint=...)``: a resumed run continues
      bit-identically.
    - The task weights, averaged over the steps since the last log, join the Trainer's logs
      (``log_history``, TensorBoard and the other ``report_to`` integrations) by task name:
      ``task_weights/weight/{task}``, ``task_weights/balance_ratio`` and, for Golden Pendulum,
      ``task_weights/alpha/{task}`` (none for GCond, whose update has no weights); with
      ``diagnostics``, the diagnostics engine's statistics (``diagnostics/conflict_ratio``,
      ``norm_ratio``, ``balance_ratio``, ...).

    .. code-block:: python

        trainer = MultiTaskTrainer(
            model=model,  # forward(**batch) returns {"losses": {"sentiment": ..., "topic": ...}}
            args=TrainingArguments("out", gradient_accumulation_steps=4, report_to="none"),
            train_dataset=dataset,
            aggregator="gcond",  # or an aggregator, or {"name": "upgrad"}
        )
        trainer.train()

    Evaluation uses the sum of the task losses. DeepSpeed, FSDP and multi-process data
    parallelism are not supported: torchjd writes ``.grad`` itself, outside their hooks.

    :param aggregator: The aggregator, or a name or config for
        :func:`~torchjd_golden.aggregator_from_config`.
    :param diagnostics: ``True`` to attach the diagnostics engine
        (:class:`~torchjd_golden.ConflictMonitor`) to the aggregator: it records each step's
        Gramian (the one the aggregation computed: no extra backward pass); or a recorder to
        attach the same way: a :class:`~torchjd_golden.ConflictMonitor` of your own, or any
        object with a ``record(gramian, weights=None, *, tasks=None)`` method.
    :param args: The positional and keyword arguments of :class:`transformers.Trainer`.
    """

    def __init__(
        self,
        *args: Any,
        aggregator: object = "upgrad",
        diagnostics: bool | DiagnosticsRecorder = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.jacobian_step = JacobianStep(aggregator, diagnostics)
        self.aggregator = self.jacobian_step.aggregator.to(self.args.device)
        self._logged_sums: dict[str, Tensor] = {}
        self._logged_steps = 0

    @property
    def diagnostics(self) -> DiagnosticsRecorder | ConflictMonitor | None:
        """The diagnostics engine (``diagnostics=True``) or the recorder given, or ``None``."""
        return self.jacobian_step.recorder

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Adds the micro-batch's Jacobian to ``.jac``; after the last one, aggregates it."""

        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()  # type: ignore[union-attr]
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        micro_batches = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        losses = self.jacobian_step.take(outputs) / micro_batches
        scaler = getattr(self.accelerator, "scaler", None)
        self.jacobian_step.backward(losses if scaler is None else scaler.scale(losses))
        if self.accelerator.sync_gradients:
            self._resolve(model, scaler)
        return losses.detach().sum()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The sum of the task losses (what evaluation reports)."""

        outputs = model(**inputs)
        loss = split_task_losses(outputs)[1].sum()
        return (loss, outputs) if return_outputs else loss

    def _resolve(self, model: nn.Module, scaler: torch.amp.GradScaler | None) -> None:
        self.jacobian_step.resolve(model.parameters(), scaler)
        if not self.jacobian_step.aggregated:
            return
        scalars = {f"task_weights/{k}": v for k, v in self.jacobian_step.weight_scalars().items()}
        scalars_of = getattr(self.diagnostics, "scalars", None)
        if callable(scalars_of):
            scalars |= {f"diagnostics/{k}": v for k, v in scalars_of().items()}
        for key, value in scalars.items():  # summed on device: read once per log
            self._logged_sums[key] = self._logged_sums.get(key, 0.0) + value.detach()
        self._logged_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the task weights, averaged since the last log, to a training log."""

        if "loss" in logs and self._logged_steps:
            for key, total in self._logged_sums.items():
                logs[key] = float(total) / self._logged_steps
            self._logged_sums, self._logged_steps = {}, 0
        super().log(logs, start_time)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            path = os.path.join(output_dir, AGGREGATOR_STATE_NAME)
            torch.save(self.aggregator.state_dict(), path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, AGGREGATOR_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The checkpoint {checkpoint!r} has no {AGGREGATOR_STATE_NAME}: it was not "
                "written by a MultiTaskTrainer, so the aggregator's state cannot be restored."
            )
        state = torch.load(path, map_location=self.args.device, weights_only=True)
        self.aggregator.load_state_dict(state)
