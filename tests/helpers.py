"""What tests share besides fixtures: the real CLI in a subprocess, the smallest training command, and readers of
what a run writes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Offline and quiet, as CI is: nothing may reach the Hub, and DeepSpeed must not look for a GPU.
CLI_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "DS_ACCELERATOR": "cpu",
    "PYTHONUNBUFFERED": "1",
}


def default_signals() -> None:
    """For a child process: SIGINT as Python expects it. A shell's background job (`nohup ... &`) starts with SIGINT
    ignored, and children inherit that, so a test of Ctrl-C would pass or fail by how pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args: list, timeout: int = 300, launcher: list[str] | None = None, env: dict | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a repo script (e.g. gkd/train.py) or `-m module` the way a user does, from the repo root."""
    command = (launcher or [sys.executable]) + [str(a) for a in args]
    return subprocess.run(command, cwd=cwd, env=env or CLI_ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=default_signals)


def train_args(student, teacher, data, output_dir, *extra) -> list[str]:
    """The smallest complete training command: 2 optimizer steps at batch 2, short completions."""
    return [str(arg) for arg in [
        "gkd/train.py",
        "--model_name_or_path", student,
        "--teacher_model_name_or_path", teacher,
        "--dataset_name", data,
        "--output_dir", output_dir,
        "--per_device_train_batch_size", "2",
        "--max_steps", "2",
        "--max_new_tokens", "8",
        "--max_length", "96",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
        *extra,
    ]]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]


def assert_user_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2, no traceback, and exactly one `error: ...` line containing each `expected` text; returns that line."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def metrics(output_dir) -> list[dict]:
    """The logged training steps of a run (lines with a loss)."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def run_config(output_dir) -> dict:
    return json.loads((Path(output_dir) / "run_config.json").read_text())


def in_process(capfd, main, argv) -> subprocess.CompletedProcess:
    """`main(argv)` run in this process as the console scripts run it (`gkd.cli.run`), stderr captured at the file
    descriptor: what a subprocess would give, without seconds of imports. For refusals that come before any model
    loads."""
    import pytest

    from gkd.cli import run

    capfd.readouterr()
    argv = [str(arg) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: main(argv), process_exit=False)
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err)


def refused(capfd, main, argv, *expected) -> str:
    """`assert_user_error` of `main(argv)` run in process, and refused before any weight loaded."""
    result = in_process(capfd, main, argv)
    line = assert_user_error(result, *expected)
    assert "Loading weights" not in result.stderr, result.stderr[-3000:]
    return line


def train_until_a_server_is_lost(args: list[str], output_dir, stop_server) -> str:
    """Start a long training (`args` of `train_args`), let it log two steps, call `stop_server`, and return its one
    `error:` line, after checking it stopped with exit 2 and no traceback."""
    import re
    import time

    training = subprocess.Popen([sys.executable, *args], cwd=REPO, env=CLI_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    output_dir = Path(output_dir)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and training.poll() is None and not (
                (output_dir / "metrics.jsonl").exists() and len(metrics(output_dir)) >= 2):
            time.sleep(0.2)
    finally:
        stop_server()
    _, stderr = training.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert training.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert re.search(r"checkpoint-(\d+)", lines[0]) and "--resume_from_checkpoint last" in lines[0], lines[0]
    return lines[0]
