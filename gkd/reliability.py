"""Surviving long runs on shared clusters: preemption, non-finite steps, interrupted saves, and exact resumption.

- Preemption (`StopOnSignal`): SIGTERM or SIGINT only sets a flag. At the end of the current optimizer step every rank
  agrees (one tiny gather per step, so a rank that got the signal late cannot leave another waiting in a collective),
  saves a checkpoint at that step and stops; the CLI then exits 0 with a line saying how to resume. A second signal
  acts at once (the previous handler is back), for a user who really wants out.
- Non-finite steps (`NonFiniteGuard`): before each optimizer step, a window whose loss or gradient is not finite on
  any rank has its gradients dropped, so the optimizer leaves every weight and moment as it was (torch optimizers skip
  parameters without a gradient). The step still counts: its batch is used up and the learning-rate schedule moves
  on (Trainer holds the schedule back only for fp16 loss-scaler skips), so step numbers, data and schedule stay
  aligned with a clean run. After `max_nonfinite_steps` such steps in a row the run saves a checkpoint (holding the
  weights from before those steps) and stops with an error. `nonfinite_skipped` in the logs counts them.
- Complete checkpoints (`complete_checkpoint`): Trainer writes `checkpoint-N/` file by file, so a kill mid-save leaves
  a folder that looks like a checkpoint. Ours are complete only once `checkpoint_complete.json` exists: it is written
  last, after every rank's files, and lists each file with its size. `save_total_limit` rotation runs only after the
  marker, and counts complete checkpoints only (Trainer's own would delete the older, complete checkpoints while the
  new one is still unfinished).
  `--resume_from_checkpoint last` picks the newest complete checkpoint and names the incomplete ones it skipped.
- Exact resumption (`sampling_rng`): Trainer restores the RNG state from `rng_state.pth` only after it has drawn the
  first resumed window (`_run_epoch` syncs RNG after `get_batch_samples`), and we sample completions inside
  `get_batch_samples`, so that window's completions came from an unrestored RNG and the resumed losses drifted. TRL
  samples from the global RNG too. We seed each window's sampling from (seed, step, rank) inside `fork_rng`: sampling
  is a pure function of the step, on a fresh run or a resumed one, and the rest of training's randomness (dropout if
  enabled) keeps the global RNG that Trainer checkpoints.

Not covered: under DeepSpeed the optimizer steps inside `backward`, before we can look at the gradients, so a
non-finite step is counted (from its loss) and stops the run, but its update is DeepSpeed's business (fp16 loss
scaling skips it, bf16/fp32 do not). With fp16 mixed precision on a GPU, gradient overflow belongs to the loss scaler,
so only the loss is checked.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from .errors import ConfigError, GKDError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(GKDError):
    """Too many optimizer steps in a row had a non-finite loss or gradient; a checkpoint was saved before stopping."""


# ------------------------------------------------------------------------------------------- exact resumption


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one window's on-policy sampling: a pure function of the run's seed, the step and the rank.

    Hashed, so it is uncorrelated with `completion_source`'s draw for the same step and with neighbouring steps."""
    digest = hashlib.sha256(f"gkd-sampling:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@contextlib.contextmanager
def sampling_rng(seed: int, step: int, rank: int, device: torch.device):
    """Sample from a seed fixed by (seed, step, rank), and give the global RNG back untouched afterwards."""
    on_accelerator = device.type != "cpu"
    devices = [device] if on_accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if on_accelerator else None):
        torch.manual_seed(sampling_seed(seed, step, rank))
        yield


# ------------------------------------------------------------------------------------------ complete checkpoints


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not folder.is_dir():
        return "no such folder"
    if not marker.is_file():
        return f"no {COMPLETE_MARKER}: its save was interrupted"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    return None


def checkpoints_by_step(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders, oldest step first, complete or not."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint (highest step, as Trainer's `get_last_checkpoint`), and the newer incomplete
    ones it passed over, each with its problem."""
    skipped = []
    for folder in reversed(checkpoints_by_step(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def resolve_resume(training_args) -> str | None:
    """`--resume_from_checkpoint`: a folder (checked complete) or `last`/`true` (the newest complete checkpoint in
    output_dir). Checked before any model loads, so a wrong path fails in seconds."""
    value = training_args.resume_from_checkpoint
    if value is None or value is False or str(value).strip() == "":
        return None
    if str(value).lower() in ("last", "true"):
        checkpoint, skipped = last_complete_checkpoint(training_args.output_dir)
        for folder, problem in skipped:
            logger.warning("skipping incomplete checkpoint %s (%s)", folder, problem)
        if checkpoint is None:
            raise ConfigError(
                f"--resume_from_checkpoint {value}: no complete checkpoint in {training_args.output_dir}"
                + (f" ({len(skipped)} incomplete)" if skipped else "")
            )
        logger.info("resuming from %s, the newest complete checkpoint", checkpoint)
        return str(checkpoint)
    problem = checkpoint_problem(value)
    if problem is not None:
        latest, _ = last_complete_checkpoint(Path(value).parent)
        hint = f"; the newest complete one there is {latest}" if latest else ""
        raise ConfigError(f"--resume_from_checkpoint {value}: not a complete checkpoint ({problem}){hint}")
    return str(value)


@contextlib.contextmanager
def complete_checkpoint(trainer, trial=None):
    """Wrap Trainer's `_save_checkpoint`: drop a stale marker first, write the marker last, rotate afterwards."""
    args = trainer.args
    accelerator = trainer.accelerator
    folder = Path(trainer._get_output_dir(trial=trial)) / f"checkpoint-{trainer.state.global_step}"
    if accelerator.is_main_process:
        # Re-saving a step (resumed from an older checkpoint): the folder is not complete while files are replaced.
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    accelerator.wait_for_everyone()  # no rank writes into the folder before its old marker is gone
    limit, args.save_total_limit = args.save_total_limit, None  # Trainer would rotate before our marker exists
    try:
        yield
    finally:
        args.save_total_limit = limit
    accelerator.wait_for_everyone()  # every rank's files (rng states, DeepSpeed shards) are written
    if accelerator.is_main_process:
        _write_marker(folder, trainer.state.global_step)
        rotate_complete_checkpoints(folder.parent, limit, keep=[folder, trainer.state.best_model_checkpoint])


def _write_marker(folder: Path, step: int) -> None:
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER
    }
    staging = folder / f".{COMPLETE_MARKER}.tmp"
    with open(staging, "w") as handle:
        json.dump({"global_step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, folder / COMPLETE_MARKER)  # the marker appears whole or not at all


def rotate_complete_checkpoints(output_dir: Path, limit: int | None, keep: list) -> None:
    """Trainer's `save_total_limit`, counted among complete checkpoints only: delete the oldest steps first, never the
    one just written nor the best one. Incomplete folders are left alone (and never resumed from)."""
    if not limit or limit <= 0:
        return
    protected = {Path(path).resolve() for path in keep if path}
    complete = [path for path in checkpoints_by_step(output_dir) if checkpoint_problem(path) is None]
    excess = len(complete) - max(limit, len(protected))
    for path in complete:
        if excess <= 0:
            break
        if path.resolve() not in protected:
            logger.info("deleting %s (save_total_limit=%d)", path, limit)
            shutil.rmtree(path, ignore_errors=True)
            excess -= 1


# ------------------------------------------------------------------------------------------------ callbacks


def _any_rank(accelerator, flag: bool, device) -> bool:
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
        self.step_skipped = _any_rank(trainer.accelerator, not finite, args.device)
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
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for signum in self.SIGNALS:
                self.previous_handlers[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and _any_rank(self.trainer.accelerator, self.received is not None, args.device):
            self.stopped_at = state.global_step
            logger.warning(
                "%s: saving a checkpoint at step %d and stopping",
                f"{signal.Signals(self.received).name} received" if self.received else "another rank got a stop signal",
                state.global_step,
            )
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self.previous_handlers.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler or signal.SIG_DFL)
        self.previous_handlers.clear()


def stopped_early(trainer) -> bool:
    """After `trainer.train()`: True when a signal stopped the run (its checkpoint is the result, not a final model);
    raises `NonFiniteError` when non-finite steps did."""
    output_dir = trainer.args.output_dir
    guard, stop = trainer.nonfinite_guard, trainer.stop_on_signal
    if guard.tripped_at is not None:
        raise NonFiniteError(
            f"{guard.in_a_row} optimizer steps in a row (steps {guard.first_bad_step}-{guard.tripped_at}) had a "
            f"non-finite loss or gradient and were skipped; stopped, with the weights from before them saved to "
            f"{os.path.join(output_dir, f'checkpoint-{guard.tripped_at}')}. Lower --learning_rate, check the data "
            "and the models' weights, or raise --max_nonfinite_steps"
        )
    if stop.stopped_at is not None:
        if trainer.accelerator.is_main_process:
            name = signal.Signals(stop.received).name if stop.received else "a signal to another rank"
            logger.warning(
                "stopped by %s after step %d: checkpoint saved to %s; continue with the same command and "
                "--resume_from_checkpoint last",
                name,
                stop.stopped_at,
                os.path.join(output_dir, f"checkpoint-{stop.stopped_at}"),
            )
        return True
    return False
