"""What the launcher was asked for against what came up, checked once at start.

Three launches go wrong without an error, and all are easy to make:
- `accelerate launch --cpu --config_file ds_configs/zero3.yaml --num_processes 2` starts ONE plain process: `--cpu`
  turns DeepSpeed off and picks accelerate's simple launcher, which ignores `--num_processes`.
- `accelerate launch --num_processes 2 gkd/train.py` with no `--config_file` (and no default config) on a machine
  without GPUs: the same simple launcher, the same one process.
- DeepSpeed ranks on a machine without a GPU: accelerate finds no process-group backend, reports world size 1 to the
  Trainer while DeepSpeed itself joins all ranks, and the run dies in DeepSpeed's batch-size assertion. Naming gloo
  (`cpu_deepspeed_backend`) makes both agree; this is how the CPU tests run real ZeRO ranks.
And one that goes wrong at the very end: gloo ranks that exit right after their last collective can abort in C++
(`leave_process_group`).
Only launch plumbing reads the environment here; nothing in it decides how training behaves.
"""

import logging
import os

logger = logging.getLogger(__name__)


def with_cpu_deepspeed_backend(argv: list[str]) -> list[str]:
    """`argv` with `--ddp_backend gloo` added for a DeepSpeed rank on a machine without GPU (unless it names a
    backend): TrainingArguments sets up the process group while it is built, so the choice must be among its
    arguments, not made after."""
    import torch

    backend = cpu_deepspeed_backend(torch.cuda.is_available())
    if backend is None or any(arg == "--ddp_backend" or arg.startswith("--ddp_backend=") for arg in argv):
        return argv
    return [*argv, "--ddp_backend", backend]


def cpu_deepspeed_backend(has_accelerator: bool) -> str | None:
    """'gloo' for a rank that accelerate launched with DeepSpeed on a machine without GPU, else None (accelerate's
    own choice: nccl on GPUs)."""
    launched_rank = os.environ.get("LOCAL_RANK") is not None
    return "gloo" if launched_rank and _flag("ACCELERATE_USE_DEEPSPEED") and not has_accelerator else None


def launch_problems(world_size: int, distributed_type: str, launcher_command: list[str] | None = None) -> list[str]:
    """Why this process's distributed layout is not the one the launch asked for; empty when it is.

    `launcher_command` defaults to the parent's command line when the parent is `accelerate launch`."""
    if launcher_command is None:
        launcher_command = _launcher_command()
    problems = []
    launched_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched_world > 1 and world_size == 1:
        problems.append(
            f"the launcher started {launched_world} processes (WORLD_SIZE={launched_world}) but this one trains "
            "alone (world size 1): every process trains its own copy on the whole dataset"
        )
    # accelerate's simple launcher (one process, no torchrun: no WORLD_SIZE) sets ACCELERATE_USE_CPU always, and
    # MASTER_ADDR only when asked for more than one process or machine; the count itself is on its command line.
    simple_launcher = "WORLD_SIZE" not in os.environ and "ACCELERATE_USE_CPU" in os.environ
    requested = _requested_processes(launcher_command)
    if simple_launcher and os.environ.get("MASTER_ADDR") and requested != 1:
        asked = f"--num_processes {requested}" if requested else "several processes"
        if _flag("ACCELERATE_USE_CPU"):
            problems.append(
                f"`accelerate launch --cpu` was asked for {asked} but started this one alone (world size 1): "
                "--cpu ignores --num_processes and DeepSpeed"
            )
        else:
            problems.append(
                f"`accelerate launch` was asked for {asked} but started this one alone (world size 1): without "
                "--multi_gpu or a --config_file naming a distributed type (e.g. ds_configs/zero2.yaml), accelerate "
                "starts one plain process and ignores --num_processes"
            )
    deepspeed_named = _flag("ACCELERATE_USE_DEEPSPEED") or _names_deepspeed_config(launcher_command)
    if deepspeed_named and distributed_type != "DEEPSPEED":
        problems.append(
            f"a DeepSpeed config was named but DeepSpeed is not active (distributed type {distributed_type}); "
            "`accelerate launch --cpu` turns it off: launch without --cpu (CPU ranks use gloo on their own)"
        )
    return problems


def warn_about_launch(training_args) -> list[str]:
    """Log a loud banner for every launch problem of this process; returns the problems (for run_config.json).

    A warning, not a refusal: a process that came up alone still trains correctly (on all the data, with its own
    batch size), the banner and run_config.json's launch_problems say it was not what was asked, and the
    environment these checks read may be inherited from a job script."""
    return warn_about_state(training_args.distributed_state, training_args.world_size)


def warn_about_state(state, world_size: int | None = None) -> list[str]:
    """`warn_about_launch` for a tool that runs on accelerate's `PartialState` instead of a Trainer."""
    distributed_type = str(state.distributed_type).split(".")[-1] if state is not None else "NO"
    if world_size is None:
        world_size = state.num_processes if state is not None else 1
    problems = launch_problems(world_size, distributed_type)
    if problems:
        bar = "!" * 100
        lines = "\n".join(f"!!! {problem}" for problem in problems)
        logger.warning(
            "\n%s\n!!! LAUNCH MISMATCH: this run is not distributed the way it was launched\n%s\n%s",
            bar,
            lines,
            bar,
        )
    return problems


def uses_deepspeed(training_args) -> bool:
    """Whether the run asks for DeepSpeed: a --deepspeed config, or `accelerate launch` with a DeepSpeed config."""
    return bool(getattr(training_args, "deepspeed", None)) or _flag("ACCELERATE_USE_DEEPSPEED")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _launcher_command() -> list[str]:
    """The parent's command line when the parent is `accelerate launch` (the only trace `--cpu` leaves)."""
    try:
        import psutil

        parent = psutil.Process().parent()
        command, folder = parent.cmdline(), parent.cwd()
    except Exception:  # no psutil, no permission, no parent: the check is best effort
        return []
    # `accelerate launch ...`, `python .../accelerate launch ...` or `python -m accelerate.commands.launch ...`
    head = command[:3]
    if not any("accelerate" in part for part in head) or not any(part.endswith("launch") for part in head):
        return []
    # A relative --config_file is relative to where the launcher ran.
    return [os.path.join(folder, arg) if arg.endswith((".yaml", ".yml")) else arg for arg in command]


def _requested_processes(command: list[str]) -> int | None:
    """`--num_processes N` of an `accelerate launch` command line; None when it does not say."""
    for index, arg in enumerate(command):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else None
        if arg == "--num_processes" and index + 1 < len(command):
            value = command[index + 1]
        if value is not None:
            return int(value) if value.strip().isdigit() else None
    return None


def _names_deepspeed_config(command: list[str]) -> bool:
    """True when an `accelerate launch` command line names DeepSpeed: a flag, or a config file whose type is it."""
    if any(arg in ("--use_deepspeed", "--deepspeed_config_file") for arg in command):
        return True
    for index, arg in enumerate(command):
        path = arg.split("=", 1)[1] if arg.startswith("--config_file=") else None
        if arg == "--config_file" and index + 1 < len(command):
            path = command[index + 1]
        if path:
            try:
                import yaml

                with open(path) as handle:
                    config = yaml.safe_load(handle) or {}
            except (OSError, ValueError, ImportError):
                return False
            return str(config.get("distributed_type", "")).upper() == "DEEPSPEED"
    return False


def leave_process_group(accelerator, settle_seconds: float = 1.0) -> None:
    """End a run on every rank together, and leave no collective's clean-up behind for the interpreter's exit.

    gloo (CPU ranks) marks a collective done before its worker thread drops the work, and dropping it releases tensors
    that need the GIL: a rank that reaches interpreter shutdown first aborts in C++ after a finished run
    (docs/design-notes.md). So: one last barrier (a barrier holds no tensors), a pause with the GIL released for the
    worker threads to finish, then the process groups are closed. NCCL ranks need none of the pause."""
    import time

    import torch

    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        time.sleep(settle_seconds)
    accelerator.end_training()
