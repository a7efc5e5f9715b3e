"""A training run's output_dir: who may write into it, what happens to what is already there, and what the run
writes besides the model (run_config.json, metrics.jsonl).

The rules, checked before any model loads:
- A folder holding a run's results (weights, an adapter, checkpoints) is written into only by a resume of that same
  run. Resuming someone else's checkpoint into it is refused; an empty or new folder is fine.
- `--overwrite_output_dir` moves the old folder aside to `<output_dir>.replaced-N` (said in the log), so nothing of
  the old run can be mistaken for the new one's and nothing is lost.
- A folder holding only what a failed start leaves (run_config.json, metrics.jsonl, TensorBoard logs, no results) is
  cleared for the new run.
- One run at a time: the main process holds an exclusive lock on `<output_dir>/.gkd-run.lock` while it runs; the
  kernel releases it when the process dies, so a crashed run never blocks the next.
"""

import dataclasses
import json
import logging
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from transformers import TrainerCallback

from .checkpoints import checkpoint_problem, checkpoints_by_step, last_complete_checkpoint
from .errors import ConfigError
from .folders import check_output, lock_folder, move_aside, release_lock
from .launch import launch_problems

logger = logging.getLogger(__name__)

LIBRARIES = ["torch", "transformers", "trl", "accelerate", "peft", "deepspeed", "datasets"]
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
# What a run leaves before it has saved anything: cleared when the folder is reused.
LEFTOVERS = (RUN_CONFIG, METRICS_FILE, "runs")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def results_in(folder: str | Path) -> list[str]:
    """The names in `folder` that are a run's results: weights, an adapter, trainer state, checkpoints."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [name for name in (*ADAPTER_FILES, *MODEL_FILES, "trainer_state.json") if (folder / name).exists()]
    return names + [path.name for path in checkpoints_by_step(folder)]


def resolve_resume(training_args, model_args, script_args=None) -> str | None:
    """`--resume_from_checkpoint`, checked and resolved before any model loads: a complete checkpoint of the kind and
    shape this run trains (adapter or full model, the same student and LoRA options), with steps left to train, that
    is not older than results already in the folder it resumes into; or `last`/`true` for the newest complete one in
    output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None or value is False or str(value).strip() == "":
        return None
    flag = f"--resume_from_checkpoint {value}"
    if training_args.overwrite_output_dir:
        raise ConfigError(f"give {flag} (continue a run) or --overwrite_output_dir (start anew), not both")
    if str(value).lower() in ("last", "true"):
        checkpoint, skipped = last_complete_checkpoint(training_args.output_dir)
        for folder, problem in skipped:
            logger.warning("skipping incomplete checkpoint %s (%s)", folder, problem)
        if checkpoint is None:
            raise ConfigError(
                f"{flag}: no complete checkpoint in {training_args.output_dir}"
                + (f" ({len(skipped)} incomplete)" if skipped else "")
            )
        logger.info("resuming from %s, the newest complete checkpoint", checkpoint)
    else:
        checkpoint = Path(value)
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise ConfigError(f"{flag}: {_not_a_checkpoint(checkpoint, problem)}")
    _check_checkpoint_kind(checkpoint, model_args.use_peft, flag)
    if str(value).lower() not in ("last", "true"):  # `last` is the newest: nothing can lie past it
        _check_not_rewound(checkpoint, Path(training_args.output_dir), flag)
    _check_steps_left(checkpoint, training_args, flag)
    _check_same_run(checkpoint, model_args, script_args, flag)
    return str(checkpoint)


def _check_not_rewound(checkpoint: Path, output_dir: Path, flag: str) -> None:
    """Resuming an older checkpoint into its own folder would leave the later checkpoints (which `last` would pick
    next time) and the final model beside the new run's: refused; a new folder takes the branch."""
    if checkpoint.resolve().parent != output_dir.resolve():
        return
    step = _step_of(checkpoint)
    later = [path.name for path in checkpoints_by_step(output_dir)
             if _step_of(path) > step and checkpoint_problem(path) is None]
    later += [name for name in (*MODEL_FILES[1:], *ADAPTER_FILES[1:]) if (output_dir / name).exists()][:1]
    if later:
        raise ConfigError(f"{flag}: {output_dir} holds results past it ({_listing(later)}); resuming it there would "
                          "mix two runs: resume it into a new folder (--output_dir NEW), or resume the newest with "
                          "--resume_from_checkpoint last")


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint.name.rsplit("-", 1)[-1].isdigit() else -1


def _check_steps_left(checkpoint: Path, training_args, flag: str) -> None:
    try:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return
    if 0 < training_args.max_steps <= step:
        raise ConfigError(f"{flag} is at step {step} and --max_steps is {training_args.max_steps}: nothing is left "
                          "to train; raise --max_steps to continue the run")


def _check_same_run(checkpoint: Path, model_args, script_args, flag: str) -> None:
    """The student and LoRA options must be the checkpoint's own (its weights would not load into another shape);
    other data only warrants a warning."""
    try:
        recorded = json.loads((checkpoint.parent / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return
    was = recorded.get("model_args") or {}
    student = recorded.get("model_name_or_path") or was.get("model_name_or_path")
    if student and _absolute_if_folder(model_args.model_name_or_path) != student:
        raise ConfigError(f"{flag} was trained from the student {student}; this run names "
                          f"{model_args.model_name_or_path}: resume it with the same --model_name_or_path")
    if model_args.use_peft:
        for name in ("lora_r", "lora_alpha", "lora_target_modules"):
            if name in was and was[name] != getattr(model_args, name):
                raise ConfigError(f"{flag} was trained with --{name} {was[name]}; this run gives "
                                  f"{getattr(model_args, name)}: resume it with the same LoRA options")
    _check_same_teachers(recorded, model_args, flag)
    data = (recorded.get("script_args") or {}).get("dataset_name")
    if script_args is not None and data and data != script_args.dataset_name:
        logger.warning("%s was trained on %s; this run continues it on %s", checkpoint, data, script_args.dataset_name)


def _not_a_checkpoint(folder: Path, problem: str) -> str:
    if checkpoints_by_step(folder) or (folder / RUN_CONFIG).exists():
        latest, _ = last_complete_checkpoint(folder)
        example = f", or {latest}" if latest else ""
        return (f"is a run's output folder, not a checkpoint; resume it with --output_dir {folder} "
                f"--resume_from_checkpoint last{example}")
    latest, _ = last_complete_checkpoint(folder.parent)
    hint = f"; the newest complete one there is {latest}" if latest else ""
    return f"not a complete checkpoint ({problem}){hint}"


def _check_checkpoint_kind(checkpoint: Path, use_peft: bool, flag: str) -> None:
    has_adapter = (checkpoint / "adapter_config.json").exists()
    if has_adapter and not use_peft:
        raise ConfigError(f"{flag} holds a LoRA adapter: resume it with --use_peft (and the same LoRA options)")
    if not has_adapter and use_peft:
        raise ConfigError(f"{flag} holds a fully fine-tuned model, not a LoRA adapter: resume it without --use_peft")


def check(training_args, inputs: list[str | None] = ()) -> None:
    """What every rank checks, read-only, before any model loads: the folder can be written, writing into it loses
    nothing, it is none of the run's `inputs` (model folders, data, a teacher cache), holds none and lies inside none,
    and no other run holds it (folders.check_output). `training_args.resume_from_checkpoint` is already resolved."""
    output_dir = check_output(training_args.output_dir, inputs)  # what every tool checks of its output folder
    results = results_in(output_dir)
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint:
        resumes_here = Path(checkpoint).resolve().parent == output_dir.resolve()
        if results and not resumes_here and not training_args.overwrite_output_dir:
            raise ConfigError(
                f"--output_dir {output_dir} holds another run's results ({_listing(results)}); resuming "
                f"{checkpoint} into it would mix two runs: resume into {Path(checkpoint).parent} or into an empty "
                "folder"
            )
    elif results and not training_args.overwrite_output_dir:
        raise ConfigError(
            f"--output_dir {output_dir} already holds a run's results ({_listing(results)}); pass "
            "--resume_from_checkpoint last to continue it, --overwrite_output_dir to move it aside and start anew, "
            "or choose another --output_dir"
        )


def prepare(training_args) -> None:
    """The main process, after `check` passed on every rank: lock the folder, then make it the new run's."""
    output_dir = Path(training_args.output_dir)
    checkpoint = training_args.resume_from_checkpoint
    resumes_here = bool(checkpoint) and Path(checkpoint).resolve().parent == output_dir.resolve()
    if output_dir.is_dir():
        old_lock = lock_folder(output_dir)
        if results_in(output_dir) and not resumes_here:  # only with --overwrite_output_dir, `check` made sure
            aside = move_aside(output_dir, "replaced")
            logger.warning("--overwrite_output_dir: moved the previous run in %s to %s (delete it when you no longer "
                           "need it)", output_dir, aside)
        elif not resumes_here and _clear_leftovers(output_dir):
            release_lock(old_lock)
            old_lock = None
        if output_dir.is_dir():
            if resumes_here:
                _trim_metrics(output_dir, int(Path(checkpoint).name.split("-")[-1]))
            return
        if old_lock is not None:
            release_lock(old_lock)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_folder(output_dir)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _clear_leftovers(folder: Path) -> bool:
    """What a run that saved nothing left: a failed start's files are replaced; a run that logged training steps
    before it died is moved aside whole (its metrics may be all its user has of it). True when moved aside."""
    found = [name for name in LEFTOVERS if (folder / name).exists()]
    if (folder / METRICS_FILE).exists() and any("loss" in record for record in read_metrics(folder)):
        aside = move_aside(folder, "replaced")
        logger.warning("%s held a run that logged steps but saved nothing; moved it to %s", folder, aside)
        return True
    for name in found:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if found:
        logger.info("%s held no results, only %s from a run that saved nothing: replaced", folder, ", ".join(found))
    return False


def _trim_metrics(folder: Path, step: int) -> None:
    """A resumed run logs its steps again after the checkpoint's: drop the old lines past it, and a last line cut by
    a crash, so metrics.jsonl reads as one run."""
    path = folder / METRICS_FILE
    if path.exists():
        kept = [line for line, record in _metric_lines(path)
                if record.get("step", 0) <= step and "train_runtime" not in record]  # the end-of-run summary too
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(folder: str | Path) -> list[dict]:
    """Every whole line of a run's metrics.jsonl (a line cut short by a crash is skipped)."""
    return [record for _, record in _metric_lines(Path(folder) / METRICS_FILE)]


def _metric_lines(path: Path):
    """(line, record) for each line of metrics.jsonl that is a whole JSON object."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield line, record


class MetricsFileCallback(TrainerCallback):
    """Every log line also goes to output_dir/metrics.jsonl: one JSON object per line, easy to plot or tail."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, METRICS_FILE), "a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def write_run_config(trainer, script_args, model_args, training_args) -> None:
    """run_config.json: the resolved arguments, library versions and the distributed layout, for reproducing a run."""
    accelerator = trainer.accelerator
    if not accelerator.is_main_process:
        return
    plugin = accelerator.state.deepspeed_plugin
    distributed_type = str(accelerator.distributed_type).split(".")[-1]
    record = {
        "command": sys.argv,
        "script_args": dataclasses.asdict(script_args),
        "model_args": dataclasses.asdict(model_args),
        "training_args": json.loads(training_args.to_json_string()),
        "versions": {name: _version(name) for name in LIBRARIES},
        "world_size": accelerator.num_processes,
        "distributed_type": distributed_type,
        "zero_stage": int(plugin.zero_stage) if plugin is not None else None,
        # The launch check of gkd/launch.py, kept with the run: empty when the layout is what was launched.
        "launch_problems": launch_problems(accelerator.num_processes, distributed_type),
        # Absolute when a folder, so merge_lora finds the base from anywhere; a Hub id as given.
        "model_name_or_path": _absolute_if_folder(model_args.model_name_or_path),
        "teacher_model_name_or_path": _absolute_if_folder(model_args.teacher_model_name_or_path),
        "teachers": teacher_identities(model_args),  # --teacher NAME=SOURCE: a resume must name the same ones
    }
    path = Path(training_args.output_dir) / RUN_CONFIG
    path.write_text(json.dumps(record, indent=2, default=str))


def teacher_identities(model_args) -> list[dict]:
    """Each `--teacher NAME=SOURCE` as a resume compares it: its name, kind and source (absolute if a folder), a Hub
    teacher's revision, a cache's manifest hash (a rebuilt cache is another teacher). Empty with one teacher given
    the single-teacher way."""
    import hashlib

    identities = []
    for spec in model_args.teacher_specs:
        identity = {"name": spec.name, "kind": spec.kind, "source": _absolute_if_folder(spec.source)}
        if spec.kind == "live" and not os.path.isdir(spec.source):
            identity["revision"] = model_args.teacher_model_revision
        if spec.kind == "cache":
            manifest = Path(spec.source) / "cache.json"
            identity["cache_hash"] = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
        identities.append(identity)
    return identities


def _check_same_teachers(recorded: dict, model_args, flag: str) -> None:
    """A run resumed with other teachers would change what its later steps learn from: refused, naming the first
    difference (a run recorded before teachers were recorded is not checked)."""
    if "teachers" not in recorded:
        return
    was = {teacher["name"]: teacher for teacher in recorded["teachers"]}
    now = {teacher["name"]: teacher for teacher in teacher_identities(model_args)}
    default = recorded.get("model_args", {}).get("default_teacher")
    if was == now and now and "model_args" in recorded and default != model_args.default_teacher:
        raise ConfigError(f"{flag} was trained with --default_teacher {default}; this run gives "
                          f"{model_args.default_teacher}: the records that name no teacher would learn from another; "
                          "resume it with the same --default_teacher")
    if was == now:
        return
    if not was or not now:
        several, one = "several teachers (--teacher NAME=SOURCE)", "one teacher (--teacher_model_name_or_path, ...)"
        was_given, now_given = (several, one) if was else (one, several)
        raise ConfigError(f"{flag} was trained with {was_given}; this run gives {now_given}: resume it with the same "
                          "teachers")
    missing, added = sorted(set(was) - set(now)), sorted(set(now) - set(was))
    if missing or added:
        difference = ", ".join([f"without --teacher {name}" for name in missing] +
                               [f"with a new --teacher {name}" for name in added])
        raise ConfigError(f"{flag} was trained with the teachers {', '.join(was)}; this run is {difference}: resume "
                          "it with the same --teacher options")
    name = next(name for name in was if was[name] != now[name])
    changed = next(key for key in ("source", "kind", "revision", "cache_hash")
                   if was[name].get(key) != now[name].get(key))
    raise ConfigError(f"{flag} was trained with --teacher {name} {changed} {was[name].get(changed)}; this run gives "
                      f"{now[name].get(changed)}: resume it with the same teacher")


def _absolute_if_folder(name: str | None) -> str | None:
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def save_final_model(trainer, output_dir: str | Path) -> None:
    """The trained model (or adapter) into output_dir, staged: every rank saves into a hidden folder (ZeRO-3 gathers
    the weights collectively), then the main process moves each finished file into place. An interruption leaves the
    folder as it was before the save, not a config.json without weights."""
    output_dir = Path(output_dir)
    staging = output_dir / ".final-save.partial"
    accelerator = trainer.accelerator
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in sorted(staging.iterdir()):
            target = output_dir / path.name
            if target.is_dir() and not path.is_dir():
                shutil.rmtree(target)
            elif path.is_dir() and target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(path, target)
        staging.rmdir()
    accelerator.wait_for_everyone()
