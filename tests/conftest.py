"""Shared fixtures: tiny models and a small dataset, built once per session (helpers.py has the shared functions)."""

import json
import os
import tempfile

import pytest
from helpers import CLI_ENV

# In-process tests run the CLIs' code in this process: offline and quiet, as the subprocesses and CI are, with the
# encoded-data cache in a folder of this session's (never the user's). Set before any test module imports
# huggingface_hub or datasets, which read these once.
CLI_ENV["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="gkd-tests-datasets-")
for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
             "HF_DATASETS_CACHE"):
    os.environ[name] = CLI_ENV[name]


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


@pytest.fixture(scope="session")
def second_teacher(tiny_models, tmp_path_factory):
    """Another teacher for the student of `tiny_models`: its tokenizer, other weights (another seed), 2 layers."""
    from tiny import make_model
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("second_teacher") / "teacher"
    make_model(folder, AutoTokenizer.from_pretrained(tiny_models[0]), num_layers=2, seed=7)
    return folder


@pytest.fixture(scope="session")
def tokenizer_pair(tmp_path_factory):
    """{"packs": folder, "digits": folder}: two locally trained tokenizers of different families (tokenizer_pairs.py):
    "packs" (ChatML, numbers packed, no BOS) and "digits" (Phi-3 style, one token per digit, BOS <s>)."""
    from tokenizer_pairs import KINDS, train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer_pair")
    for kind in KINDS:
        train_tokenizer(root / kind, kind)
    return {kind: root / kind for kind in KINDS}


@pytest.fixture(scope="session")
def cross_tokenizer_models(tokenizer_pair, tmp_path_factory):
    """(student, teacher) folders across tokenizers: a 2-layer Llama on "packs" and a 3-layer Llama on "digits",
    each saved with its own tokenizer and vocabulary exactly that tokenizer's length."""
    from tokenizer_pairs import tiny_model_for

    root = tmp_path_factory.mktemp("cross_tokenizer_models")
    student = tiny_model_for(root / "student", tokenizer_pair["packs"], seed=0, num_layers=2)
    teacher = tiny_model_for(root / "teacher", tokenizer_pair["digits"], seed=1, num_layers=3)
    return student, teacher


@pytest.fixture(scope="session")
def cross_tokenizer_data(tmp_path_factory):
    """A 16-record `messages` dataset whose texts carry numbers, emoji, CJK and whitespace runs."""
    from tokenizer_pairs import write_chat_dataset

    return write_chat_dataset(tmp_path_factory.mktemp("cross_data") / "chat.jsonl", 16)
