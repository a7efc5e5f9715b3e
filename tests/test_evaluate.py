"""gkd-eval (gkd/tools/evaluate.py) on tiny models: metrics that mean what they say, intervals, tables, curves."""

import json
import random

import pytest
import torch
from helpers import REPO, assert_ok, assert_user_error, run_cli, train_args

from gkd.tools.evaluate import bootstrap_interval, paired_difference


@pytest.mark.subprocess
def test_evaluate_reports_each_student_a_lora_run_and_the_teacher_as_reference(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    lora_run = tmp_path / "lora"
    assert_ok(run_cli(train_args(student, teacher, chat_data, lora_run, "--use_peft", "--max_steps", "1")))
    out = tmp_path / "eval"
    result = run_cli(
        ["-m", "gkd.evaluate", "--student", f"before={student}", "--student", f"after={lora_run}",
         "--teacher", teacher, "--dataset_name", REPO / "examples/data/chat.jsonl", "--output_dir", out,
         "--max_new_tokens", "6", "--bootstrap_samples", "200"],
        timeout=300,
    )
    assert_ok(result)
    report = json.loads((out / "eval.json").read_text())
    assert list(report["models"]) == ["before", "after", "teacher"]  # the README's form: a LoRA run as a student
    before, reference = report["models"]["before"], report["models"]["teacher"]
    # The teacher against itself diverges by nothing; a different random model diverges by something.
    assert abs(reference["reverse_kl"]) < 1e-5 and abs(reference["jsd"]) < 1e-5
    assert before["reverse_kl"] > 1e-4 and before["jsd"] > 1e-4
    # The teacher's greedy responses are its own argmax: it scores them better than a random student does.
    assert reference["teacher_nll"] < before["teacher_nll"]
    assert 0.0 <= before["answer_accuracy"] <= 1.0  # chat.jsonl records carry `answers`
    low, high = before["reverse_kl_ci"]
    assert low <= before["reverse_kl"] <= high
    assert len(report["per_prompt"]["before"]["answer_hits"]) == report["num_prompts"]
    assert report["samples"] and "teacher" in report["samples"][0]
    table = (out / "eval.md").read_text()
    assert "reverse KL" in table and "| before | after | teacher |" in table and "bootstrap" in table


@pytest.mark.subprocess
def test_plot_run_draws_training_curves_and_skips_a_line_cut_by_a_crash(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    out = tmp_path / "run"
    assert_ok(run_cli(train_args(student, teacher, chat_data, out)))
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 0.1')  # a crash in the middle of a line
    result = run_cli(["-m", "gkd.evaluate", "--plot_run", out], timeout=120)
    assert_ok(result)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.subprocess
def test_evaluate_refuses_a_missing_model_in_one_line(tiny_models, tmp_path):
    _, teacher = tiny_models
    result = run_cli(
        ["-m", "gkd.evaluate", "--student", tmp_path / "nope", "--teacher", teacher,
         "--dataset_name", REPO / "examples/data/chat.jsonl", "--output_dir", tmp_path / "o"],
        timeout=120,
    )
    assert_user_error(result, "nope", "no such folder")


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_prompts():
    rng = random.Random(0)
    few = {"answer_hits": [int(rng.random() < 0.3) for _ in range(30)]}
    many = {"answer_hits": [int(rng.random() < 0.3) for _ in range(600)]}
    low, high = bootstrap_interval(few, "answer_accuracy", samples=500)
    assert low <= sum(few["answer_hits"]) / 30 <= high
    many_low, many_high = bootstrap_interval(many, "answer_accuracy", samples=500)
    assert many_high - many_low < (high - low) / 2
    assert bootstrap_interval({"answer_hits": [None, None]}, "answer_accuracy") is None  # nothing checkable


def test_paired_difference_sees_a_real_difference_that_unpaired_intervals_hide():
    """Same prompts, one student right on 6 more of 60 than the other: the paired interval excludes 0, while the
    two students' own intervals overlap."""
    rng = random.Random(1)
    weaker = [int(rng.random() < 0.5) for _ in range(60)]
    stronger = list(weaker)
    flipped = [index for index, hit in enumerate(weaker) if hit == 0][:6]
    for index in flipped:
        stronger[index] = 1
    report = {"per_prompt": {"a": {"answer_hits": stronger}, "b": {"answer_hits": weaker}}}
    difference, (low, high) = paired_difference(report, "a", "b", "answer_accuracy", samples=500)
    assert difference == pytest.approx(0.1) and low > 0
    a_low, a_high = bootstrap_interval(report["per_prompt"]["a"], "answer_accuracy", samples=500)
    b_low, b_high = bootstrap_interval(report["per_prompt"]["b"], "answer_accuracy", samples=500)
    assert a_low < b_high  # unpaired, the two intervals overlap


def test_token_weighted_metrics_weight_each_token_once():
    per_prompt = {"reverse_kl": [1.0, 9.0], "sample_tokens": [1, 3]}
    low, high = bootstrap_interval(per_prompt, "reverse_kl", samples=200)
    assert low >= 1.0 and high <= 3.0  # each resample's value is a per-token mean: sum / tokens


def test_a_model_against_itself_diverges_by_zero_never_less(tiny_models):
    """eval.json gave the teacher a JSD of -1.6e-08 against itself: float32 rounding of two equal distributions. A
    divergence is never negative. The teacher's logits are scaled up here so that rounding shows on a tiny vocabulary
    (unclamped, some prompts come out below 0)."""
    from gkd import data, models
    from gkd.tools.evaluate import divergences

    ref = models.ModelRef(str(tiny_models[1]), flag="--teacher")
    tokenizer, teacher = models.load_tokenizer(ref), models.load_frozen(ref, "float32")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(200)
    stop_ids = models.stop_token_ids(tokenizer, ref)
    conversations = data.load_conversations(REPO / "examples/data/chat.jsonl")
    samples, _ = data.encode_conversations(conversations, tokenizer, 4096, 8, stop_ids)
    per_prompt = divergences(teacher, teacher, tokenizer, [s["prompt_ids"] for s in samples], stop_ids, 8, 8, 0)
    assert min(per_prompt["jsd"]) >= 0.0 and min(per_prompt["reverse_kl"]) >= 0.0
    assert max(per_prompt["jsd"]) < 1e-5


def test_evaluate_scores_each_record_against_its_own_teacher(capfd, tiny_models, second_teacher, chat_data, tmp_path):
    """--teacher NAME=PATH, repeated: every record is scored against the teacher it names (or the default), the
    reference row is each record's own teacher (0 divergence), and each teacher's reverse KL is reported."""
    from helpers import refused

    from gkd.tools import evaluate

    student, teacher = tiny_models
    data = tmp_path / "routed.jsonl"
    records = [json.loads(line) for line in chat_data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**record, **({"teacher": "math"} if number % 3 == 0 else {})}) + "\n"
                            for number, record in enumerate(records)))
    args = ["--student", f"before={student}", "--teacher", f"math={teacher}", "--teacher", f"chat={second_teacher}",
            "--dataset_name", data, "--max_new_tokens", "4", "--bootstrap_samples", "50"]
    args = [str(arg) for arg in args]
    assert evaluate.main(args + ["--default_teacher", "chat", "--output_dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    before, reference = report["models"]["before"], report["models"]["teacher"]
    assert abs(reference["reverse_kl"]) < 1e-5 and abs(reference["reverse_kl/math"]) < 1e-5
    assert before["reverse_kl/math"] > 1e-4 and before["reverse_kl/chat"] > 1e-4
    tokens = report["per_prompt"]["before"]["sample_tokens"]
    summed = report["per_prompt"]["before"]["reverse_kl"]
    math_rows = [row for row in range(len(records)) if row % 3 == 0]
    assert before["reverse_kl/math"] == pytest.approx(sum(summed[row] for row in math_rows)
                                                      / sum(tokens[row] for row in math_rows))
    # the math rows alone, against the math teacher alone: the same per-prompt divergences
    alone = evaluate.evaluate_folders({"before": student}, teacher,
                                      [c for n, c in enumerate(evaluate_conversations(data)) if n % 3 == 0],
                                      max_new_tokens=4, bootstrap_samples=50)
    assert alone["per_prompt"]["before"]["reverse_kl"] == pytest.approx([summed[row] for row in math_rows])
    refused(capfd, evaluate.main, args + ["--output_dir", str(tmp_path / "o")], "routed.jsonl:2",
            "names no teacher", "--default_teacher")


def test_match_case_counts_an_answer_only_as_written(tiny_models, chat_data, tmp_path):
    """--match_case: an accepted answer in capitals is a hit only where the reply has it in capitals (a skill such as
    shouting), while without it any case counts."""
    from gkd.tools import evaluate

    _, teacher = tiny_models
    records = [json.loads(line) for line in chat_data.read_text().splitlines()][:5]
    common = ["--student", f"again={teacher}", "--teacher", str(teacher), "--max_new_tokens", "4",
              "--bootstrap_samples", "50"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"messages": record["messages"]}) + "\n" for record in records))
    assert evaluate.main(common + ["--dataset_name", str(plain), "--output_dir", str(tmp_path / "replies")]) == 0
    replies = [sample["teacher"] for sample in json.loads((tmp_path / "replies" / "eval.json").read_text())["samples"]]
    shouted = [reply.strip().upper() if reply.strip() != reply.strip().upper() else None for reply in replies]
    assert any(shouted), replies  # the tiny teacher's replies have lower-case letters to shout
    data = tmp_path / "shout.jsonl"
    data.write_text("".join(json.dumps({"messages": record["messages"], **({"answers": [answer]} if answer else {})})
                            + "\n" for record, answer in zip(records, shouted)))
    hits = {}
    for flags in ([], ["--match_case", "true"]):
        out = tmp_path / f"eval{len(flags)}"
        assert evaluate.main(common + ["--dataset_name", str(data), "--output_dir", str(out), *flags]) == 0
        hits[bool(flags)] = json.loads((out / "eval.json").read_text())["per_prompt"]["teacher"]["answer_hits"]
    checked = [None if answer is None else 1 for answer in shouted]
    assert hits[False] == checked  # its own reply, in any case
    assert hits[True] == [None if hit is None else 0 for hit in checked]  # not in capitals


def evaluate_conversations(path):
    from gkd.data import load_conversations

    return load_conversations(path)


def test_a_student_of_another_tokenizer_is_scored_by_text(cross_tokenizer_models, cross_tokenizer_data, tmp_path):
    """A student trained with --cross_tokenizer ("packs" against a "digits" teacher) was refused; now every model is
    scored by text, each on its own rendering of the prompts: finite metrics, no JSD, and eval.json says so."""
    import math

    from gkd.tools import evaluate

    student, teacher = cross_tokenizer_models
    out = tmp_path / "eval"
    assert evaluate.main(["--student", f"packs={student}", "--teacher", str(teacher), "--dataset_name",
                          str(cross_tokenizer_data), "--output_dir", str(out), "--max_new_tokens", "8",
                          "--bootstrap_samples", "50"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["across_tokenizers"] is True and list(report["models"]) == ["packs", "teacher"]
    for name, metrics in report["models"].items():
        assert metrics["jsd"] is None and metrics["jsd_ci"] is None
        assert metrics["unwritable_responses"] == 0  # both tokenizers hold every byte
        for key in ("reverse_kl", "teacher_nll", "answer_accuracy", "mean_response_tokens"):
            if metrics[key] is not None or key != "answer_accuracy":
                assert math.isfinite(metrics[key]), (name, key, metrics)
        for key in ("reverse_kl_ci", "teacher_nll_ci"):
            assert all(math.isfinite(bound) for bound in metrics[key]), (name, key, metrics)
        per_prompt = report["per_prompt"][name]
        assert len(per_prompt["reverse_kl"]) == len(per_prompt["teacher_tokens"]) == report["num_prompts"] == 16
        assert all(tokens > 0 for tokens in per_prompt["sample_tokens"] + per_prompt["teacher_tokens"])
    assert report["models"]["teacher"]["reverse_kl"] == 0.0  # its own samples, its own tokens: exactly nothing
    table = (out / "eval.md").read_text()
    assert "| JSD (student samples) (lower is better) | - | - |" in table and "Across tokenizers" in table


def test_text_level_metrics_with_one_tokenizer_are_the_per_token_ones(tiny_models, chat_data):
    """The text path forced on a pair that shares a tokenizer: the teacher against itself diverges by nothing on its
    own samples, and the NLL of the teacher's responses (per teacher token) is the per-token path's, for the teacher
    and for another student: the normalisation, the prompts and the stop tokens are the same."""
    from gkd.tools import evaluate

    student, teacher = tiny_models
    conversations = evaluate_conversations(chat_data)
    per_token, by_text = (evaluate.evaluate_folders({"student": student}, teacher, conversations, max_new_tokens=6,
                                                    bootstrap_samples=50, across_tokenizers=across)
                          for across in (False, True))
    assert by_text["across_tokenizers"] is True
    assert max(abs(value) for value in by_text["per_prompt"]["teacher"]["reverse_kl"]) < 1e-5
    for name in ("student", "teacher"):
        assert by_text["models"][name]["teacher_nll"] == pytest.approx(per_token["models"][name]["teacher_nll"],
                                                                      abs=1e-4)
        assert by_text["per_prompt"][name]["teacher_nll"] == pytest.approx(
            per_token["per_prompt"][name]["teacher_nll"], abs=1e-4)
        for key in ("teacher_tokens", "response_tokens", "answer_hits"):
            assert by_text["per_prompt"][name][key] == per_token["per_prompt"][name][key], key
    assert by_text["models"]["student"]["teacher_nll"] > by_text["models"]["teacher"]["teacher_nll"]


def test_several_teachers_of_two_tokenizers_are_refused_naming_the_teachers(capfd, cross_tokenizer_models,
                                                                            cross_tokenizer_data, tmp_path):
    from helpers import refused

    from gkd.tools import evaluate

    student, teacher = cross_tokenizer_models
    args = ["--student", str(student), "--teacher", f"packs={student}", "--teacher", f"digits={teacher}",
            "--default_teacher", "packs", "--dataset_name", str(cross_tokenizer_data), "--output_dir",
            str(tmp_path / "eval")]
    refused(capfd, evaluate.main, args, "--teacher digits", "its tokenizer differs from --teacher packs's")
