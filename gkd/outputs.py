"""What a run writes besides the model: the guard that keeps earlier results, and run_config.json."""

import dataclasses
import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import ConfigError
from .launch import launch_problems

logger = logging.getLogger(__name__)

LIBRARIES = ["torch", "transformers", "trl", "accelerate", "peft", "deepspeed", "datasets"]
RESULT_MARKERS = ("run_config.json", "adapter_config.json", "config.json", "trainer_state.json")


def holds_results(output_dir: str | Path) -> bool:
    """True when the folder holds a model, an adapter, a run's config or a checkpoint."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return False
    return any((folder / name).exists() for name in RESULT_MARKERS) or any(folder.glob("checkpoint-*"))


def check_output_dir(training_args) -> None:
    """Never overwrite a previous run's results silently: resume from them, or say --overwrite_output_dir."""
    if training_args.resume_from_checkpoint or training_args.overwrite_output_dir:
        return
    if holds_results(training_args.output_dir):
        raise ConfigError(
            f"{training_args.output_dir} already holds a run's results; pass --resume_from_checkpoint to continue "
            "it, --overwrite_output_dir to replace it, or choose another --output_dir"
        )


def write_run_config(trainer, script_args, model_args, training_args) -> None:
    """run_config.json: the resolved arguments, library versions and the distributed layout, for reproducing a run."""
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()  # every rank has passed check_output_dir before the folder gets results
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
        "model_name_or_path": os.path.abspath(model_args.model_name_or_path),
        "teacher_model_name_or_path": os.path.abspath(model_args.teacher_model_name_or_path),
    }
    path = Path(training_args.output_dir) / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
