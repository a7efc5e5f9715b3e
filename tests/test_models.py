"""gkd/models.py: models by folder or Hub id, checked before any weight loads; and the whole run from Hub ids with
`HF_HUB_OFFLINE=1` and a warm cache, as offline clusters run (the cache is built here, nothing is downloaded)."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import CLI_ENV, REPO, assert_ok, metrics, run_cli, train_args

from gkd.errors import ConfigError, ModelError
from gkd.models import ModelRef, check_lora_targets, check_model, safetensors_problem

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home: Path, repo_type: str, repo_id: str, files: Path) -> Path:
    """The layout huggingface_hub reads offline: `hub/<type>s--org--name/snapshots/<sha>/...` and `refs/main`."""
    repo = home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(files, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def test_safetensors_problem_reads_the_header_only(tiny_models, tmp_path):
    weights = Path(tiny_models[0]) / "model.safetensors"
    assert safetensors_problem(weights) is None
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-100])
    assert "truncated" in safetensors_problem(cut)
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(weights.read_bytes()[:4])
    assert "truncated" in safetensors_problem(header_only)


def test_lora_targets_are_checked_on_a_weightless_copy(tiny_models):
    check_lora_targets(ModelRef(str(tiny_models[0])), ["q_proj", "down_proj"])
    with pytest.raises(ConfigError, match="--lora_target_modules lm_heads: the student has no such linear module"):
        check_lora_targets(ModelRef(str(tiny_models[0])), ["q_proj", "lm_heads"])


def test_a_hub_id_resolves_from_the_offline_cache_and_a_missing_one_is_one_line(tiny_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub_cache(tmp_path, "model", "org/student", Path(tiny_models[0]))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model(ModelRef("org/student"))
    with pytest.raises(ModelError, match="org/missing: not a folder, and not a model the Hub"):
        check_model(ModelRef("org/missing"))


@pytest.mark.subprocess
def test_train_and_evaluate_from_hub_ids_offline(tiny_models, tmp_path):
    """Student, teacher and dataset named by Hub id, resolved from a warm HF cache with HF_HUB_OFFLINE=1."""
    home = tmp_path / "hf_home"
    hub_cache(home, "model", "org/student", Path(tiny_models[0]))
    hub_cache(home, "model", "org/teacher", Path(tiny_models[1]))
    data = tmp_path / "data_repo" / "data"
    data.mkdir(parents=True)
    record = {"messages": [{"role": "user", "content": "name a colour."}, {"role": "assistant", "content": "red."}],
              "answers": ["red"]}
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    hub_cache(home, "dataset", "org/colours", tmp_path / "data_repo")
    env = {**CLI_ENV, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)

    out = tmp_path / "run"
    result = run_cli(train_args("org/student", "org/teacher", "org/colours", out, "--eval_strategy", "steps",
                                "--eval_steps", "1"), env=env)
    assert_ok(result)
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert any("eval_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_name_or_path"] == "org/student"  # a Hub id is recorded as given, not made a path

    result = run_cli(["-m", "gkd.evaluate", "--student", "org/student", "--teacher", "org/teacher",
                      "--dataset_name", REPO / "examples/data/chat.jsonl", "--output_dir", tmp_path / "eval",
                      "--max_new_tokens", "4", "--max_records", "2", "--bootstrap_samples", "10"], env=env)
    assert_ok(result)
    missing = run_cli(train_args("org/student", "org/absent", "org/colours", tmp_path / "o"), env=env)
    assert missing.returncode == 2 and "org/absent" in missing.stderr and "Traceback" not in missing.stderr


def test_a_max_length_beyond_learned_positions_is_refused_and_rotary_models_pass(tiny_models, tmp_path):
    """GPT-2's positions are a table: a longer sequence is an IndexError inside the forward. Refused before any
    weight loads; a rotary model (the tiny Llama, 512 positions) is not held to its config's number."""
    from transformers import GPT2Config

    from gkd.models import check_context

    GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=32).save_pretrained(tmp_path)
    ref = ModelRef(str(tmp_path), flag="--teacher_model_name_or_path")
    check_context(ref, 64)
    with pytest.raises(ModelError, match="--max_length 65 is more than its 64 learned positions"):
        check_context(ref, 65)
    check_context(ModelRef(str(tiny_models[0]), flag="--model_name_or_path"), 4096)
