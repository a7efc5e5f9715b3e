"""Preemption: SIGTERM or SIGINT only sets a flag. At the end of the current optimizer step every rank agrees (one tiny
gather per step, so a rank that got the signal late cannot leave another waiting in a collective), saves a checkpoint
at that step and stops; the CLI then exits 0 with the command that resumes. The handlers stay in place through the
final save, so a signal there lets the save finish first, and the run ends as a finished one: exit 0, with a line saying
where the model is. A second signal acts at once (the previous handler is back), for a user who really wants out; the
final save is staged, so even then the folder keeps its previous state.
"""

import logging
import os
import signal
import threading

from transformers import TrainerCallback

from .guards import any_rank

logger = logging.getLogger(__name__)


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT: finish the current optimizer step, save a checkpoint there, stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer):
        self.trainer = trainer
        self.received = None  # the first signal's number
        self.stopped_at = None  # the step whose checkpoint was saved
        self.previous_handlers = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        signal.signal(signum, self.previous_handlers.get(signum) or signal.SIG_DFL)  # a second one acts at once

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread() and not self.previous_handlers:
            for signum in self.SIGNALS:  # Python only delivers signals to the main thread
                self.previous_handlers[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and any_rank(self.trainer.accelerator, self.received is not None, args.device):
            self.stopped_at = state.global_step
            logger.warning(
                "%s: saving a checkpoint at step %d and stopping",
                f"{signal.Signals(self.received).name} received" if self.received else "another rank got a stop signal",
                state.global_step,
            )
            control.should_save = True
            control.should_training_stop = True
        return control

    def release(self) -> None:
        """Give the signals back to their previous handlers: after the final save, not at the end of `train()`."""
        for signum, handler in self.previous_handlers.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous_handlers.clear()

    def stopped_by_signal(self) -> bool:
        """After `trainer.train()`: True when a signal stopped the run (its checkpoint is the result, not a final
        model)."""
        if self.stopped_at is None:
            return False
        if self.trainer.accelerator.is_main_process:
            name = signal.Signals(self.received).name if self.received else "a signal to another rank"
            checkpoint = os.path.join(self.trainer.args.output_dir, f"checkpoint-{self.stopped_at}")
            logger.warning("stopped by %s after step %d: checkpoint saved to %s; continue with the same command and "
                           "--resume_from_checkpoint last", name, self.stopped_at, checkpoint)
        return True

    def report_after_save(self) -> None:
        """A signal that came after the last step, during the final save: the save finished first, and the run is
        complete (the CLI exits 0, so a scheduler does not mark it failed); say where its model is."""
        if self.received is not None and self.stopped_at is None and self.trainer.accelerator.is_main_process:
            logger.warning("the final model is saved in %s; %s arrived during the save, which finished first",
                           self.trainer.args.output_dir, signal.Signals(self.received).name)
