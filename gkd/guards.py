"""Non-finite steps: before each optimizer step, a window whose loss or gradient is not finite on any rank has its
gradients dropped, so the optimizer leaves every weight and moment as it was (torch optimizers skip parameters without
a gradient). The step still counts: its batch is used up and the learning-rate schedule moves on, so step numbers,
data and schedule stay aligned with a clean run. After `max_nonfinite_steps` such steps in a row the run saves a
checkpoint (holding the weights from before them) and stops with an error.

Not covered: under DeepSpeed the optimizer steps inside `backward`, before the gradients can be looked at, so a
non-finite step is counted (from its loss) and stops the run, but its update is DeepSpeed's business. With fp16 on a
GPU, gradient overflow belongs to the loss scaler, so only the loss is checked.
"""

import logging
import os

import torch
from transformers import TrainerCallback

from .errors import GKDError

logger = logging.getLogger(__name__)


class NonFiniteError(GKDError):
    """Too many optimizer steps in a row had a non-finite loss or gradient; a checkpoint was saved before stopping."""


def any_rank(accelerator, flag: bool, device) -> bool:
    """True when `flag` is true on any rank: a gather every rank runs, so every rank takes the same branch."""
    return bool(accelerator.gather(torch.tensor([float(flag)], device=device)).max().item() > 0)


class NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps whose loss or gradient is not finite; stops after `max_nonfinite_steps` in a row."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.window_losses: list[torch.Tensor] = []  # this rank's micro-batch losses of the current window
        self.step_skipped = False
        self.in_a_row = 0
        self.first_bad_step = None
        self.skipped_since_log = 0
        self.tripped_at = None  # the step at which the run gave up, when it did

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called by `training_step` for each micro-batch; checked once per window, without a sync per micro-batch."""
        self.window_losses.append(loss.detach().reshape(()))

    def add_to_log(self, logs: dict, steps: int) -> None:
        """`nonfinite_skipped`: steps skipped since the last log line, of `steps`. Trainer's `logging_nan_inf_filter`
        logs a skipped step's loss as the window's mean so far, which is 0.0 when no step of the window was finite:
        then the loss is logged as NaN, not as a perfect 0."""
        skipped, self.skipped_since_log = self.skipped_since_log, 0
        logs["nonfinite_skipped"] = skipped
        if skipped and skipped >= steps:
            logs["loss"] = float("nan")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        finite = bool(torch.stack(self.window_losses).isfinite().all()) if self.window_losses else True
        self.window_losses.clear()
        parameters = [p for p in trainer.model.parameters() if p.grad is not None]
        if finite and parameters and trainer.accelerator.scaler is None:
            # After clipping a NaN norm every gradient is NaN; an inf norm (overflow) is caught here as well.
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in parameters])))
        self.step_skipped = any_rank(trainer.accelerator, not finite, args.device)
        if self.step_skipped:
            for parameter in parameters:
                parameter.grad = None  # the optimizer then leaves weights and moments untouched

    def on_step_end(self, args, state, control, **kwargs):
        if not self.step_skipped:
            self.in_a_row = 0
            return control
        self.step_skipped = False
        self.in_a_row += 1
        self.skipped_since_log += 1
        if self.in_a_row == 1:
            self.first_bad_step = state.global_step
        logger.warning(
            "step %d: non-finite loss or gradient, optimizer step skipped (%d in a row, stopping at %d)",
            state.global_step,
            self.in_a_row,
            args.max_nonfinite_steps,
        )
        if self.in_a_row >= args.max_nonfinite_steps:
            self.tripped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def raise_if_tripped(trainer) -> None:
    """After `trainer.train()`: the run's error when non-finite steps stopped it."""
    guard = trainer.nonfinite_guard
    if guard.tripped_at is not None:
        checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{guard.tripped_at}")
        raise NonFiniteError(
            f"{guard.in_a_row} optimizer steps in a row (steps {guard.first_bad_step}-{guard.tripped_at}) had a "
            f"non-finite loss or gradient and were skipped; stopped, with the weights from before them saved to "
            f"{checkpoint}. Lower --learning_rate, check the data and the models' weights, or raise "
            "--max_nonfinite_steps"
        )
