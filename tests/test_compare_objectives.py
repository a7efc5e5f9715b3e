"""scripts/compare_objectives.py on tiny models: every objective trains through the real CLI and is evaluated."""

import json
import shutil
from pathlib import Path

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


def test_a_preempted_run_resumes_from_its_checkpoint_and_nothing_is_deleted(tiny_models, chat_data, tmp_path):
    """A study rerun after its run `kd` was stopped part-way (a complete checkpoint-1, the user's NOTES.txt, no final
    model) removed the folder and trained from step 0. It resumes from the checkpoint, as the README says."""
    from gkd.tools import compare

    student, teacher = (str(Path(path).resolve()) for path in tiny_models)
    out, plan = tmp_path / "study", tmp_path / "plan.yaml"
    plan.write_text("common: [--max_steps, 2]\nruns: {kd: [--lmbda, 0, --save_strategy, steps, --save_steps, 1]}\n")
    extra = ["--per_device_train_batch_size", "2", "--max_new_tokens", "4", "--max_length", "96", "--logging_steps",
             "1", "--disable_tqdm", "true"]
    config = compare.CompareConfig(teacher=teacher, output_dir=str(out), student=student, plan=str(plan),
                                   train_data=str(Path(chat_data).resolve()))
    runs = compare.load_plan(config, extra)
    folder, options = out / "kd", [*runs.common, *runs.runs["kd"]]
    command = compare.train_command(runs.students["student"], config, options, 0, folder)
    assert run_cli(command[1:]).returncode == 0
    # what a run preempted after step 1 leaves: its checkpoint and the step's metrics, no step 2, no final model
    shutil.rmtree(folder / "checkpoint-2")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (folder / name).unlink()
    (folder / "NOTES.txt").write_text("mine")
    step_one = [line for line in (folder / "metrics.jsonl").read_text().splitlines() if '"step": 1,' in line]
    result = run_cli(["scripts/compare_objectives.py", "--plan", plan, "--student", student, "--teacher", teacher,
                      "--output_dir", out,
                      "--train_data", chat_data, "--val_data", REPO / "examples/data/chat.jsonl", "--eval_records",
                      "2", "--eval_max_new_tokens", "4", "--bootstrap_samples", "20", *extra], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming it" in result.stdout and "training it again" not in result.stdout
    assert (folder / "NOTES.txt").read_text() == "mine" and (folder / "checkpoint-1").is_dir()
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"loss"' in line] == [1, 2]
    assert [line for line in lines if '"step": 1,' in line] == step_one  # step 1 was not trained again
    assert compare.next_step(folder, "kd", command, overwrite=False) == "reuse"  # the next rerun reuses it


def test_a_run_folder_that_can_be_neither_reused_nor_resumed_moves_aside_only_with_overwrite(tmp_path):
    from gkd.errors import ConfigError
    from gkd.tools import compare

    command = ["python", "gkd/train.py", "--max_steps", "2"]
    folder = tmp_path / "kd"
    assert compare.next_step(folder, "kd", command, overwrite=False) == "train"  # new
    folder.mkdir()
    (folder / "run_config.json").write_text(json.dumps({"command": ["gkd/train.py", "--max_steps", "2"]}))
    assert compare.next_step(folder, "kd", command, overwrite=False) == "train"  # a failed start: gkd-train clears it
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # killed after a step, nothing saved
    with pytest.raises(ConfigError, match="kd: .* no complete checkpoint to resume from .*pass --overwrite"):
        compare.next_step(folder, "kd", command, overwrite=False)
    assert compare.next_step(folder, "kd", command, overwrite=True) == "replace"
    assert sorted(path.name for path in folder.iterdir()) == ["metrics.jsonl", "run_config.json"]  # judged, untouched


def test_an_interval_that_prints_as_zero_is_not_bold():
    """results.md bolded `-0.000 [-0.000, -0.000]` (two equal models) as a real difference."""
    from gkd.tools.compare import differences_table

    def row(value, low, high):
        return {"reference": "start", **{metric: {"difference": value, "interval": [low, high]}
                                         for metric in ("answer_accuracy", "reverse_kl", "teacher_nll")}}

    table = differences_table({"same": row(-2e-5, -4e-5, -1e-6), "better": row(-0.2, -0.3, -0.1)})
    same = next(line for line in table.splitlines() if line.startswith("| same"))
    assert "**" not in same and "-0.000" not in same and "+0.000 [+0.000, +0.000]" in same
    assert "**-0.200 [-0.300, -0.100]**" in table
