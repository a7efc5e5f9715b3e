"""The training CLI end to end, in subprocesses, on tiny models: what a user runs is what is tested."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_ok, metrics, run_cli, train_args
from test_docs import readme_metrics

pytestmark = pytest.mark.subprocess


def test_help_documents_every_llm_dojo_flag():
    result = run_cli(["gkd/train.py", "--help"], timeout=120)
    assert_ok(result)
    for flag in [
        "--model_name_or_path", "--teacher_model_name_or_path", "--dataset_name", "--learning_rate",
        "--per_device_train_batch_size", "--gradient_accumulation_steps", "--output_dir", "--logging_steps",
        "--dataset_batch_size", "--num_train_epochs", "--gradient_checkpointing", "--lmbda", "--beta", "--use_peft",
        "--lora_r", "--lora_alpha", "--trust_remote_code", "--bf16", "--save_strategy", "--save_steps",
        "--save_total_limit", "--warmup_steps", "--lr_scheduler_type", "--seq_kd", "--torch_dtype", "--dtype",
        "--temperature", "--max_new_tokens", "--max_length", "--disable_dropout", "--lora_target_modules",
        "--lora_dropout", "--loss_temperature", "--config",
    ]:
        assert flag in result.stdout, flag


def test_llm_dojo_command_and_data_format(tiny_models, tmp_path):
    """LLM-Dojo's train_gkd.py command line, verbatim flags, on LLM-Dojo's prompt-list records, with LoRA."""
    student, teacher = tiny_models
    out = tmp_path / "dojo"
    command = [
        "gkd/train.py",
        "--model_name_or_path", student, "--teacher_model_name_or_path", teacher,
        "--dataset_name", REPO / "examples/data/llm_dojo.json",
        "--learning_rate", "2e-5", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--output_dir", out, "--logging_steps", "1", "--dataset_batch_size", "16", "--num_train_epochs", "1",
        "--gradient_checkpointing", "--lmbda", "0.5", "--beta", "0.5", "--use_peft", "--lora_r", "8",
        "--lora_alpha", "16", "--trust_remote_code", "--bf16", "--save_strategy", "steps", "--save_steps", "1",
        "--save_total_limit", "1", "--warmup_steps", "1", "--lr_scheduler_type", "cosine", "--seq_kd", "True",
        "--torch_dtype", "auto", "--max_new_tokens", "8", "--max_length", "128", "--report_to", "none",
    ]
    result = run_cli(command)
    assert_ok(result)
    # --gradient_checkpointing reaches transformers under its 5.23 name, without the deprecation warnings (ours, peft's,
    # trl's) that told the user nothing; no pin_memory warning on CPU either.
    assert "FutureWarning" not in result.stderr and "pin_memory" not in result.stderr, result.stderr[-2000:]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "tokenizer_config.json").exists()
    assert len(list(out.glob("checkpoint-*"))) == 1  # save_total_limit honoured
    config = json.loads((out / "run_config.json").read_text())
    assert config["world_size"] == 1 and config["model_args"]["use_peft"] is True
    assert config["training_args"]["seq_kd"] is True and "trl" in config["versions"]
    assert config["training_args"]["activation_checkpointing"] is True
    logged = metrics(out)
    # Prompt-only records: every step samples (student or teacher), never an empty target, so tokens are trained.
    assert all(m["on_policy"] + m["teacher_generated"] == 1 for m in logged)
    assert all(m["completion_tokens"] > 0 and m["loss"] > 0 for m in logged)


@pytest.mark.parametrize("lmbda,beta", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_lmbda_and_beta(tiny_models, chat_data, tmp_path, lmbda, beta):
    student, teacher = tiny_models
    out = tmp_path / "run"
    result = run_cli(
        train_args(student, teacher, chat_data, out, "--lmbda", lmbda, "--beta", beta, "--max_steps", "4")
    )
    assert_ok(result)
    logged = metrics(out)
    assert len(logged) == 4
    share = sum(m["on_policy"] for m in logged) / len(logged)
    if lmbda in (0.0, 1.0):
        assert share == lmbda
    else:
        assert 0.0 <= share <= 1.0
    assert all(m["teacher_generated"] == 0 for m in logged)
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["loss"] >= 0 for m in logged)
    # Full fine-tuning saves a whole model that loads with plain from_pretrained, with changed weights.
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(student)
    assert any(
        not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), original.state_dict().values())
    )


def test_seq_kd_trains_on_teacher_completions(tiny_models, chat_data, tmp_path):
    """Run as `python -m gkd.train`, the form `accelerate launch -m gkd.train` uses."""
    student, teacher = tiny_models
    out = tmp_path / "seqkd"
    result = run_cli(["-m", "gkd.train", *train_args(student, teacher, chat_data, out, "--lmbda", "0", "--seq_kd",
                                                       "True")[1:]])
    assert_ok(result)
    assert all(m["teacher_generated"] == 1 and m["on_policy"] == 0 for m in metrics(out))


def test_yaml_config(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    out = tmp_path / "yaml"
    config = tmp_path / "run.yaml"
    config.write_text(f"lmbda: 1.0\nbeta: 0.0\nmodel_name_or_path: {student}\n")
    args = train_args("unused", teacher, chat_data, out)
    args[args.index("--model_name_or_path") : args.index("--model_name_or_path") + 2] = []
    console_script = Path(sys.executable).parent / "gkd-train"  # installed by pyproject.toml
    result = run_cli(args[1:] + ["--config", config], launcher=[str(console_script)])
    assert_ok(result)
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["training_args"]["lmbda"] == 1.0 and run_config["training_args"]["beta"] == 0.0
    assert all(m["on_policy"] == 1 for m in metrics(out))


def test_a_two_step_run_logs_the_pinned_losses(tiny_models, chat_data, tmp_path):
    """torchtune's recipe tests pin their losses: a change of behaviour (data order, the coin, sampling, the loss's
    terms or normalisation) cannot pass silently. Step 1 is a dataset step with KD + SFT, step 2 on-policy (KD only:
    the SFT term never trains on the student's samples); the tiny random models are near-uniform, so KD is small.
    Recorded on the project's x86-64 CPUs with torch 2.13.0; a tolerance of 1e-4 absorbs another CPU's kernels."""
    student, teacher = tiny_models
    out = tmp_path / "pinned"
    assert_ok(run_cli(train_args(student, teacher, chat_data, out, "--lmbda", "0.5", "--seed", "2",
                                 "--learning_rate", "1e-2", "--sft_loss_weight", "0.5")))
    first, second = metrics(out)
    assert (first["on_policy"], second["on_policy"]) == (0, 1)
    assert first["loss"] == pytest.approx(2.85530948638916, rel=1e-4)
    assert first["kd_loss"] == pytest.approx(0.003238097997382283, rel=1e-4)
    assert first["sft_loss"] == pytest.approx(5.7041425704956055, rel=1e-4)
    assert second["loss"] == pytest.approx(0.003250731620937586, rel=1e-4) and "sft_loss" not in second
    # The README's Outputs section lists exactly these keys (tests/test_docs.py checks the rest of its list).
    always, _, summary = readme_metrics()
    assert (set(first), set(second)) == (always | {"step", "kd_loss", "sft_loss"}, always | {"step", "kd_loss"})
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary <= set(last) <= summary | {"step", "epoch"}


def test_plain_text_trains_on_every_token_and_continues_windows_on_policy(tiny_models, tmp_path):
    """NeMo-style logit distillation on raw text: windows of --max_length, the first --text_prompt_tokens of a window
    as the prompt on on-policy steps."""
    student, teacher = tiny_models
    data = tmp_path / "text.jsonl"
    text = "the quick brown fox jumps over the lazy dog. two plus two is four. " * 12
    data.write_text("\n".join(json.dumps({"text": text[: 200 + 40 * i]}) for i in range(4)) + "\n")
    out = tmp_path / "text"
    result = run_cli(train_args(student, teacher, data, out, "--lmbda", "0.5", "--seed", "2",
                                "--text_prompt_tokens", "6", "--max_length", "64"))
    assert_ok(result)
    assert "plain-text windows" in result.stderr
    logged = metrics(out)
    assert [m["on_policy"] for m in logged] == [0, 1]
    assert logged[0]["completion_tokens"] > 30  # a dataset step trains on the whole window but its first token
