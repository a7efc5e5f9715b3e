"""Shared fixtures: tiny models built once per session, and the real CLI run in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(student, teacher) folders: 2- and 3-layer random Llamas sharing a ChatML tokenizer (pad == eos)."""
    from tiny import make_student_and_teacher

    return make_student_and_teacher(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """A small `messages` dataset with short responses, enough for a few steps at batch 2."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    questions = [
        ("what is the capital of france?", "the capital of france is paris."),
        ("name a colour.", "red."),
        ("what is two plus two?", "two plus two is four."),
        ("name an animal.", "a cat."),
        ("how are you today?", "i am fine, thank you!"),
        ("what is three plus five?", "three plus five is eight."),
        ("say hello.", "hello world."),
        ("name another colour.", "blue."),
    ]
    with path.open("w") as handle:
        for question, answer in questions:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_cli(args: list[str], timeout: int = 300, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run a repo script (e.g. gkd/train.py) the way a user does, from the repo root."""
    command = (launcher or [sys.executable]) + [str(a) for a in args]
    return subprocess.run(command, cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=timeout)


def train_args(student, teacher, data, output_dir, *extra) -> list[str]:
    """The smallest complete training command: 2 optimizer steps at batch 2, short completions."""
    return [
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
    ]
