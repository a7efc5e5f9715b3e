"""gkd/launch.py: a launch that asked for several processes and got one says so, through the real `accelerate launch`.

Without `--config_file` (and no default config), `accelerate launch --num_processes 2` on a machine without GPUs runs
accelerate's simple launcher: one plain process, no WORLD_SIZE, and nothing in accelerate complains.
"""

import sys

import pytest
from helpers import CLI_ENV, REPO, assert_ok, run_cli, run_config, train_args

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def no_default_config(tmp_path) -> dict:
    """accelerate reads a default config from $HF_HOME/accelerate: none here, whatever this machine has."""
    return {**CLI_ENV, "HF_HOME": str(tmp_path / "hf_home")}


def test_launch_problems_of_the_simple_launcher(monkeypatch):
    """What the simple launcher exports: ACCELERATE_USE_CPU always, MASTER_ADDR only for more than one process, no
    WORLD_SIZE; the count asked for is on the launcher's command line."""
    from gkd.launch import launch_problems

    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    two = ["accelerate", "launch", "--num_processes", "2", "gkd/train.py"]
    (alone,) = launch_problems(1, "NO", two)
    assert "--num_processes 2" in alone and "world size 1" in alone
    assert "--num_processes 3" in launch_problems(1, "NO", ["accelerate", "launch", "--num_processes=3", "x.py"])[0]
    # One process asked for, MASTER_ADDR inherited from a job script: nothing is wrong.
    assert launch_problems(1, "NO", ["accelerate", "launch", "--num_processes", "1", "gkd/train.py"]) == []
    monkeypatch.delenv("MASTER_ADDR")
    assert launch_problems(1, "NO", two[:2] + ["gkd/train.py"]) == []


@pytest.mark.subprocess
def test_two_processes_asked_one_started_warns_loudly(tiny_models, chat_data, tmp_path):
    out = tmp_path / "run"
    args = train_args(*tiny_models, chat_data, out, "--max_steps", "1", "--lmbda", "0")
    result = run_cli(["--num_processes", "2", "--main_process_port", "0", *args], launcher=LAUNCH,
                     env=no_default_config(tmp_path))
    assert_ok(result)
    assert "LAUNCH MISMATCH" in result.stderr and "asked for --num_processes 2" in result.stderr
    config = run_config(out)
    assert config["world_size"] == 1
    (problem,) = config["launch_problems"]
    assert "--num_processes 2" in problem


@pytest.mark.subprocess
def test_cache_teacher_warns_too(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    result = run_cli(["--num_processes", "2", "--main_process_port", "0", "-m", "gkd.tools.cache_teacher",
                      "--teacher_model_name_or_path", teacher, "--tokenizer_name_or_path", student,
                      "--dataset_name", chat_data, "--top_k", "4", "--output_dir", tmp_path / "cache",
                      "--max_length", "96", "--max_new_tokens", "8"],
                     launcher=LAUNCH, env=no_default_config(tmp_path), cwd=REPO)
    assert_ok(result)
    assert "LAUNCH MISMATCH" in result.stderr and "asked for --num_processes 2" in result.stderr
