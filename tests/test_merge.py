"""End-to-end tests of scripts/merge_lora.py: the real command line in a subprocess, on a tiny Llama and a LoRA made
with peft directly and laid out the way the trainer saves a `--use_peft` run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CLI_ENV, REPO, default_signals, run_cli, train_args
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tiny import make_model, make_tokenizer
from transformers import AutoModelForCausalLM

from gkd.errors import ModelError
from gkd.tools.merge import check_adapter_fits, read_adapter_shapes

pytestmark = pytest.mark.subprocess

SCRIPT = REPO / "scripts" / "merge_lora.py"


def perturbed_adapter(base_dir: Path, seed: int):
    """A LoRA on q_proj and v_proj whose lora_B is non-zero (peft initialises it to zero: a no-op adapter)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """base/, and run/ as a `--use_peft` run leaves it: adapter, tokenizer, run_config.json, and a checkpoint-2/
    with its own (different) adapter, trainer files and DeepSpeed shards, whose recorded base path is relative to
    a directory the merge does not run from (so the base must come from the run's run_config.json)."""
    root = tmp_path_factory.mktemp("merge")
    tokenizer = make_tokenizer(root / "tokenizer")
    base = root / "base"
    make_model(base, tokenizer)
    run = root / "run"
    perturbed_adapter(base, seed=1).save_pretrained(run)
    tokenizer.save_pretrained(run)
    run_config = {"model_args": {"model_name_or_path": "models/student", "use_peft": True}, "model_name_or_path": str(base)}
    (run / "run_config.json").write_text(json.dumps(run_config))  # as gkd/outputs.py writes it: as given, and absolute

    checkpoint = run / "checkpoint-2"
    perturbed_adapter(base, seed=2).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    edit_json(checkpoint / "adapter_config.json", base_model_name_or_path="models/student")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (checkpoint / "latest").write_text("global_step2")
    (checkpoint / "global_step2").mkdir()
    (checkpoint / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"not a model")
    (checkpoint / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a model")

    wide = root / "wide"  # same vocabulary, other hidden size: the adapter's shapes do not fit
    make_model(wide, tokenizer, hidden_size=48)
    return root


def run_merge(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI, from a directory that is not the repository (so `import gkd` must work from anywhere)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd, env=CLI_ENV, capture_output=True, text=True, timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=tokens).logits.float()


def reference_logits(base: Path, adapter: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base+adapter, base alone) in float32, computed with peft without merging."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with model.disable_adapter():
        base_logits = logits_of(model, tokens)
    return logits_of(model, tokens), base_logits


def sample_tokens() -> torch.Tensor:
    return torch.arange(3, 40).reshape(1, -1)


def saved_tensors(folder: Path) -> dict[str, torch.dtype]:
    dtypes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            dtypes.update({key: handle.get_tensor(key).dtype for key in handle.keys()})
    return dtypes


def test_merged_model_is_standalone_and_matches_base_plus_adapter(workspace, tmp_path):
    run, base, out = workspace / "run", workspace / "base", tmp_path / "merged"
    result = run_merge("--adapter_path", run, "--output_dir", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"base model: {base}" in result.stdout and "adapter_config.json" in result.stdout
    assert "verify: max |logit difference|" in result.stdout

    files = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert "chat_template.jinja" in files or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert not {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"} & files
    keys = saved_tensors(out)
    assert keys and not [key for key in keys if "lora" in key or key.startswith("base_model.")]
    config_text = (out / "config.json").read_text().lower()
    assert "peft" not in config_text and "adapter" not in config_text and "lora" not in config_text
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folder left behind

    # Loadable by transformers alone: peft made unimportable in a fresh interpreter.
    load = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"assert AutoTokenizer.from_pretrained({str(out)!r}).chat_template\n"
    )
    loaded = subprocess.run([sys.executable, "-c", load], env=CLI_ENV, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr

    tokens = sample_tokens()
    merged = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokens)
    adapted, base_only = reference_logits(base, run, tokens)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - base_only).abs().max() > 1e-2  # the adapter did change the model, so the check above can fail


def test_checkpoint_folder_with_deepspeed_shards_bf16_and_overwrite(workspace, tmp_path):
    """checkpoint-N: DeepSpeed global_step* ignored, base found through the parent's run_config.json, bf16 output
    verified at the bf16 tolerance, and an earlier export moved aside by --overwrite."""
    checkpoint, base, out = workspace / "run" / "checkpoint-2", workspace / "base", tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    result = run_merge(
        "--adapter_path", checkpoint, "--output_dir", out, "--dtype", "bf16", "--overwrite", cwd=tmp_path
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"base model: {base} (from {workspace / 'run' / 'run_config.json'}" in result.stdout
    assert "verify: max |logit difference|" in result.stdout
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "merged.replaced-1"]  # old one set aside
    assert (tmp_path / "merged.replaced-1" / "old.txt").read_text() == "previous export"
    assert "merged.replaced-1" in result.stdout + result.stderr
    assert set(saved_tensors(out).values()) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    tokens = sample_tokens()
    merged = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokens)
    adapted, _ = reference_logits(base, checkpoint, tokens)
    final_adapter, _ = reference_logits(base, workspace / "run", tokens)
    scale = adapted.abs().max().clamp(min=1.0)
    assert (merged - adapted).abs().max() < 5e-2 * scale  # gkd.tools.merge's bfloat16 tolerance
    assert (merged - final_adapter).abs().max() > 0.1  # it merged checkpoint-2's adapter, not the run's final one


def test_existing_output_is_kept_unless_a_complete_verified_merge_replaces_it(workspace, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous export")

    untouched = run_merge("--adapter_path", workspace / "run", "--output_dir", out, cwd=tmp_path)
    assert_one_line_error(untouched, "not empty", "--overwrite")
    # A verification that cannot pass (bf16 rounding always moves the logits): the merge fails after writing
    # everything, and the old folder must survive with no half-written sibling.
    failed = run_merge(
        "--adapter_path", workspace / "run", "--output_dir", out, "--overwrite", "--dtype", "bf16",
        "--verify_tolerance", "0", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(failed, "verification failed", "nothing was written")
    assert [path.name for path in out.iterdir()] == ["old.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_adapter_for_another_model_shape(workspace, tmp_path):
    out = tmp_path / "merged"
    result = run_merge(
        "--adapter_path", workspace / "run", "--base_model_name_or_path", workspace / "wide", "--output_dir", out,
        cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(result, "does not match base model", "48")
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_a_deeper_model_is_refused_not_half_merged(workspace, tmp_path):
    """peft would only warn about the adapter's layer-1 tensors and merge layer 0: a silently wrong export."""
    shallow = make_model(tmp_path / "shallow", make_tokenizer(tmp_path / "tokenizer"), num_layers=1)
    adapter = workspace / "run"
    with pytest.raises(ModelError, match="has no module model.layers.1.self_attn.q_proj"):
        check_adapter_fits(shallow, read_adapter_shapes(adapter), adapter, "shallow")


def test_interrupted_merge_leaves_nothing(workspace, tmp_path):
    out = tmp_path / "merged"
    command = [sys.executable, str(SCRIPT), "--adapter_path", str(workspace / "run"), "--output_dir", str(out)]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_signals,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".merged.merging-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the merge finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case",
    ["full_model", "empty_folder", "missing_adapter", "missing_base", "no_base_recorded", "output_is_file_child",
     "output_contains_input"],
)  # fmt: skip
def test_bad_inputs_fail_in_one_line_and_write_nothing(workspace, tmp_path, case):
    run, out = workspace / "run", tmp_path / "out" / "merged"
    args, words = ["--adapter_path", run, "--output_dir", out], []
    if case == "full_model":  # a full fine-tuning run: config.json + weights, no adapter
        args[1], words = workspace / "base", ["full fine-tuning run", "nothing to merge", "load it directly"]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[1], words = tmp_path / "empty", ["no LoRA adapter", "adapter_config.json"]
    elif case == "missing_adapter":
        args[1], words = tmp_path / "nowhere", ["adapter path", "does not exist"]
    elif case == "missing_base":
        args += ["--base_model_name_or_path", tmp_path / "no-such-base"]
        words = ["base model path", "does not exist"]
    elif case == "no_base_recorded":  # recorded base gone, and no run_config.json to fall back on
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(run / name, adapter / name)
        edit_json(adapter / "adapter_config.json", base_model_name_or_path=str(tmp_path / "gone"))
        args[1], words = adapter, ["does not exist", "--base_model_name_or_path"]
    elif case == "output_is_file_child":  # unwritable: the parent is a file (works as root, unlike chmod)
        (tmp_path / "out").write_text("a file")
        words = ["cannot write --output_dir"]
    elif case == "output_contains_input":  # --overwrite on the run folder would delete checkpoint-2 itself
        args = ["--adapter_path", run / "checkpoint-2", "--output_dir", run, "--overwrite"]
        words = ["would replace the input"]
    before = sorted(path.name for path in tmp_path.iterdir())
    result = run_merge(*args, cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert (run / "checkpoint-2" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_folder(workspace, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_merge("--adapter_path", workspace / "run", "--output_dir", locked / "merged", cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(result, "cannot write --output_dir", "permission denied")
    assert list(locked.iterdir()) == []


def test_merge_an_adapter_trained_by_the_gkd_cli(tiny_models, chat_data, tmp_path):
    """The whole path a user takes: `gkd/train.py --use_peft` for 2 steps, then merge its output_dir."""
    student, teacher = tiny_models
    run, out = tmp_path / "run", tmp_path / "merged"
    trained = run_cli(train_args(student, teacher, chat_data, run, "--use_peft", "--learning_rate", "1e-2"))
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert (run / "adapter_config.json").is_file() and (run / "run_config.json").is_file()

    result = run_merge("--adapter_path", run, "--output_dir", out, "--no-verify", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"base model: {student}" in result.stdout and "verify:" not in result.stdout

    tokens = sample_tokens()
    merged = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokens)
    adapted, base_only = reference_logits(student, run, tokens)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - base_only).abs().max() > 1e-3  # two steps at lr 1e-2 moved the student
