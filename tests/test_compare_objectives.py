"""scripts/compare_objectives.py on tiny models: every objective trains through the real CLI and is evaluated."""

import json

import pytest
from helpers import REPO, run_cli

pytestmark = pytest.mark.subprocess


def test_compare_objectives_small(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    out = tmp_path / "compare"
    result = run_cli(
        ["scripts/compare_objectives.py", "--student", student, "--teacher", teacher, "--output_dir", out,
         "--train_data", chat_data, "--val_data", REPO / "examples/data/chat.jsonl",
         "--runs", "sft,supervised_kd,gkd_l1_b1", "--eval_records", "4", "--eval_max_new_tokens", "6",
         # train options pass through to gkd/train.py
         "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_new_tokens", "6", "--max_length", "96",
         "--learning_rate", "1e-3", "--disable_tqdm", "true"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert list(report["models"]) == ["start", "sft", "supervised_kd", "gkd_l1_b1", "teacher"]
    for name in ("sft", "supervised_kd", "gkd_l1_b1"):
        run_config = json.loads((out / name / "run_config.json").read_text())["training_args"]
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        losses = [m for m in metrics if "loss" in m]
        if name == "sft":
            assert run_config["objective"] == "sft" and all(m["teacher_generated"] == 1 for m in losses)
        if name == "gkd_l1_b1":
            assert run_config["beta"] == 1.0 and all(m["on_policy"] == 1 for m in losses)
        # each run moved its student away from the start
        assert report["models"][name]["teacher_nll"] != report["models"]["start"]["teacher_nll"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "supervised_kd" in (out / "results.md").read_text()


def test_compare_objectives_rejects_unknown_run(tiny_models, tmp_path):
    student, teacher = tiny_models
    result = run_cli(
        ["scripts/compare_objectives.py", "--student", student, "--teacher", teacher, "--output_dir", tmp_path,
         "--runs", "sft,magic"],
        timeout=120,
    )
    assert result.returncode != 0 and "magic" in result.stderr and "Traceback" not in result.stderr


def test_a_plan_with_two_students_and_a_second_seed_reuses_finished_runs(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    out = tmp_path / "study"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"students: {{a: {student}, b: {student}}}\ncommon: [--max_steps, 1]\n"
                    "runs: {kd: [--lmbda, 0, --beta, 0]}\nseeds: {kd: [1]}\n")
    command = ["scripts/compare_objectives.py", "--plan", plan, "--teacher", teacher, "--output_dir", out,
               "--train_data", chat_data, "--val_data", REPO / "examples/data/chat.jsonl", "--eval_records", "4",
               "--eval_max_new_tokens", "4", "--bootstrap_samples", "50", "--per_device_train_batch_size", "2",
               "--max_new_tokens", "4", "--max_length", "96", "--disable_tqdm", "true"]
    first = run_cli(command, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert list(report["models"]) == ["a/start", "b/start", "a/kd", "a/kd@s1", "b/kd", "b/kd@s1", "teacher"]
    assert (out / "a" / "kd-s1" / "model.safetensors").is_file()
    assert json.loads((out / "a" / "kd-s1" / "run_config.json").read_text())["training_args"]["seed"] == 1
    assert report["differences"]["a/kd"]["reference"] == "a/start"
    # student b against student a, run by run (the same student twice here: same start, so no difference)
    assert list(report["student_differences"]) == ["b/start", "b/kd", "b/kd@s1"]
    assert report["student_differences"]["b/kd@s1"]["reference"] == "a/kd@s1"
    assert report["student_differences"]["b/start"]["teacher_nll"]["difference"] == 0
    assert "Each student against the first" in (out / "results.md").read_text()
    assert "difference [95% interval]" in (out / "results.md").read_text()
    again = run_cli(command, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing it") == 4, again.stdout[-3000:]
    reused = json.loads((out / "results.json").read_text())
    # wall seconds only for what this invocation trained; every run's own training time, reused or not
    assert reused["train_seconds"] == {} and len(report["train_seconds"]) == 4
    assert reused["train_runtime"] == report["train_runtime"] and all(v > 0 for v in reused["train_runtime"].values())
    # the plan edited after its runs: the old runs are not reported under the new options
    plan.write_text(plan.read_text().replace("[--max_steps, 1]", "[--max_steps, 2]"))
    edited = run_cli(command, timeout=600)
    assert edited.returncode == 2 and "Traceback" not in edited.stderr
    assert "a/kd: " in edited.stderr and "--max_steps 1 -> 2" in edited.stderr
    assert "another --output_dir" in edited.stderr
    assert "== " not in edited.stdout  # refused before anything trained or was reused
