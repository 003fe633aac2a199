"""
Hugging Face Transformers integration: a ``Trainer`` for models whose forward returns per-task
losses (``pip install 'torchjd-golden[huggingface]'``). ``import torchjd_golden`` does not import
Transformers; this module does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..monitoring._conflict_monitor import ConflictMonitor
from ..monitoring._recorder import DiagnosticsRecorder
from ..step._sharded import GramianSource
from ..step._task_step import JacobianStep, TaskLosses, split_task_losses

__all__ = ["AGGREGATOR_STATE_NAME", "MultiTaskTrainer", "TaskLosses"]

AGGREGATOR_STATE_NAME = "aggregator.pt"
"""The file of a checkpoint folder that holds the aggregator's ``state_dict`` (one process)."""

AGGREGATOR_RANK_STATE_NAME = "aggregator_{rank}.pt"
"""Under several processes, the file of each rank's aggregator ``state_dict``."""


class MultiTaskTrainer(Trainer):
    r"""
    A :class:`transformers.Trainer` that trains by Jacobian descent a model whose forward returns
    per-task losses: a mapping from task name to loss, a vector of losses (the tasks are then
    ``task_0``, ``task_1``, ...), :class:`TaskLosses` with the shared features, or a mapping (such
    as a ``ModelOutput``) with a ``losses`` entry and maybe a ``features`` entry.

    - The step is the engine's (:class:`~torchjd_golden.JacobianDescent`, exact, with the shared
      parameters found from the features as torchjd's ``mtl_backward`` finds them, or every
      parameter without features): each micro-batch adds the Jacobian of its losses, divided by
      the number of micro-batches, to the step's, so that with ``gradient_accumulation_steps=k``
      the step holds the mean Jacobian of the :math:`k` micro-batches.
    - After the last micro-batch of a step, the aggregator combines it once (told the task names,
      and the losses for the adaptive Golden Pendulum); the Trainer then clips
      (``max_grad_norm``) and steps as usual.
    - With ``fp16=True`` the losses are scaled by the accelerator's ``GradScaler`` and the
      aggregator sees the Jacobian without the scale, as
      :func:`~torchjd_golden.with_grad_scaler` does; ``bf16=True`` needs nothing. Under either,
      the training forward runs under Accelerate's autocast without its cast of the outputs to
      float32, which would take the features off the losses' path.
    - The aggregator's ``state_dict`` is saved as ``aggregator.pt`` in every checkpoint folder
      and loaded by ``train(resume_from_checkpoint=...)``: a resumed run continues
      bit-identically.
    - Launched on several processes (``torchrun``, ``accelerate launch``), the Trainer wraps the
      model in ``DistributedDataParallel`` and the step is that of one process on the global
      batch. ExcessMTL's and GCond's state then covers this rank's columns only: each rank saves
      its own (``aggregator_{rank}.pt``) and resumes from it, on the same number of processes.
      ``ddp_find_unused_parameters`` defaults to ``False`` (``True`` would hand back the
      features detached from the losses, and is refused).
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

    Evaluation uses the sum of the task losses. DeepSpeed and FSDP are not supported: the
    engine writes ``.grad`` itself, outside their hooks.

    :param aggregator: The aggregator, or a name or config for
        :func:`~torchjd_golden.aggregator_from_config`.
    :param diagnostics: ``True`` to attach the diagnostics engine
        (:class:`~torchjd_golden.ConflictMonitor`) to the aggregator: it records each step's
        Gramian (the one the aggregation computed: no extra backward pass); or a recorder to
        attach the same way: a :class:`~torchjd_golden.ConflictMonitor` of your own, or any
        object with a ``record(gramian, weights=None, *, tasks=None)`` method.
    :param gramian_from: The engine's source of the weights (also a key of a mapping
        ``aggregator`` config): ``"parameters"`` (exact) or
        ``"features"`` (the Gramian of the gradients with respect to the model's ``features``,
        then one ordinary backward pass; Gramian weightings only).
    :param args: The positional and keyword arguments of :class:`transformers.Trainer`.
    """

    def __init__(
        self,
        *args: Any,
        aggregator: object = "upgrad",
        diagnostics: bool | DiagnosticsRecorder = False,
        gramian_from: GramianSource = "parameters",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.jacobian_step = JacobianStep(aggregator, diagnostics, gramian_from)
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
        """Adds the micro-batch's Jacobian to the step's; after the last one, aggregates it."""

        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()  # type: ignore[union-attr]
        inputs = self._prepare_inputs(inputs)
        self.jacobian_step.bind(model)  # the DDP module under several processes
        with self.compute_loss_context_manager(), self._outputs_in_the_graph(model):
            outputs = model(**inputs)
        micro_batches = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        losses = self.jacobian_step.take(outputs) / micro_batches
        scaler = getattr(self.accelerator, "scaler", None)
        self.jacobian_step.backward(losses if scaler is None else scaler.scale(losses), model)
        if self.accelerator.sync_gradients:
            self._resolve(scaler)
        return losses.detach().sum()

    @contextmanager
    def _outputs_in_the_graph(self, model: nn.Module) -> Iterator[None]:
        """
        Under ``bf16`` or ``fp16``, Accelerate wraps the model's forward in autocast and casts its
        half-precision outputs to float32: cast features are off the losses' path (the trunk's
        Jacobian through them would be zero). The training forward runs under the same autocast,
        without the cast.
        """

        inner = self.accelerator.unwrap_model(model)
        original = inner.__dict__.get("_original_forward")  # set by Accelerate's mixed precision
        if original is None:
            yield
            return
        wrapped = inner.__dict__["forward"]
        inner.forward = original
        try:
            with self.accelerator.autocast():
                yield
        finally:
            inner.forward = wrapped

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

    def _resolve(self, scaler: torch.amp.GradScaler | None) -> None:
        self.jacobian_step.resolve(scaler)
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

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        # DDP looking for unused parameters would return the features detached from the losses.
        if self.args.ddp_find_unused_parameters is None:
            self.args.ddp_find_unused_parameters = False
        return super()._build_accelerator_args(**kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.world_size > 1:  # each rank its own (ExcessMTL's, GCond's: its columns)
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.aggregator.state_dict(), os.path.join(output_dir, self._state_name()))
        elif self.args.should_save:
            torch.save(self.aggregator.state_dict(), os.path.join(output_dir, self._state_name()))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self._state_name())
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The checkpoint {checkpoint!r} has no {self._state_name()}: it was not written "
                f"by a MultiTaskTrainer on {self.args.world_size} process(es), so the "
                "aggregator's state cannot be restored."
            )
        device = self.args.device  # under several CPU processes "cpu:<rank>", which load refuses
        location = torch.device("cpu") if device.type == "cpu" else device
        state = torch.load(path, map_location=location, weights_only=True)
        self.aggregator.load_state_dict(state)

    def _state_name(self) -> str:
        if self.args.world_size > 1:
            return AGGREGATOR_RANK_STATE_NAME.format(rank=self.args.process_index)
        return AGGREGATOR_STATE_NAME
