"""Complete checkpoints: Trainer writes `checkpoint-N/` file by file, so a kill mid-save leaves a folder that looks
like a checkpoint. Ours are complete only once `checkpoint_complete.json` exists: written last, after every rank's
files, listing each file with its size. `save_total_limit` rotation runs only after the marker and counts complete
checkpoints only (Trainer's own would delete older, complete checkpoints while the new one is unfinished)."""

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def only_tied_weights_missing(model, missing_keys: list[str]) -> bool:
    """True when the keys a resumed checkpoint lacks are exactly the model's tied weights (`lm_head.weight` of a
    model with tied embeddings), each identical to the weight it is tied to. `save_pretrained` writes a tied weight
    once, under its source's name; transformers' Trainer still warns on resume that the other name is missing."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if not missing_keys or set(missing_keys) != set(tied):
        return False
    state = model.state_dict()
    return all(target in state and source in state and state[target].data_ptr() == state[source].data_ptr()
               for target, source in tied.items())
