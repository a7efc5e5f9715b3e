"""gkd.evaluate through its CLI on tiny models: metrics that mean what they say, tables, curves."""

import json

from conftest import REPO, run_cli, train_args


def test_evaluate_cli_reports_each_student_and_the_teacher_as_reference(tiny_models, tmp_path):
    student, teacher = tiny_models
    out = tmp_path / "eval"
    result = run_cli(
        ["-m", "gkd.evaluate", "--student", f"before={student}", "--teacher", teacher,
         "--dataset_name", REPO / "examples/data/chat.jsonl", "--output_dir", out, "--max_new_tokens", "6"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    before, reference = report["models"]["before"], report["models"]["teacher"]
    # The teacher against itself diverges by nothing; a different random model diverges by something.
    assert abs(reference["reverse_kl"]) < 1e-5 and abs(reference["jsd"]) < 1e-5
    assert before["reverse_kl"] > 1e-4 and before["jsd"] > 1e-4
    # The teacher's greedy responses are its own argmax: it scores them better than a random student does.
    assert reference["teacher_nll"] < before["teacher_nll"]
    assert 0.0 <= before["answer_accuracy"] <= 1.0  # chat.jsonl records carry `answers`
    assert report["samples"] and "teacher" in report["samples"][0]
    table = (out / "eval.md").read_text()
    assert "reverse KL" in table and "| before | teacher |" in table


def test_plot_run_draws_training_curves(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    out = tmp_path / "run"
    assert run_cli(train_args(student, teacher, chat_data, out)).returncode == 0
    result = run_cli(["-m", "gkd.evaluate", "--plot_run", out], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_a_missing_model_in_one_line(tiny_models, tmp_path):
    _, teacher = tiny_models
    result = run_cli(
        ["-m", "gkd.evaluate", "--student", tmp_path / "nope", "--teacher", teacher,
         "--dataset_name", REPO / "examples/data/chat.jsonl", "--output_dir", tmp_path / "o"],
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr and "no model folder" in result.stderr
