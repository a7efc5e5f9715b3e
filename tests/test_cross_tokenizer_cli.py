"""Distillation across tokenizers through the real command line (`--cross_tokenizer`): a student that packs numbers
(ChatML) learns from a teacher that writes digits one by one (Phi-3 template, BOS), both trained locally
(tokenizer_pairs.py). Refusals come in one line before any weight loads; a run logs how well the pair aligns; the
sampled reverse KL falls as the student learns; two ZeRO-3 ranks run it too."""

import json
import shutil
import statistics

import pytest
from helpers import assert_ok, metrics, refused, run_cli, train_args
from test_deepspeed import launch
from test_teacher_cli import start_server

from gkd import train

pytestmark = pytest.mark.subprocess


def cross_args(models, data, out, *extra) -> list[str]:
    student, teacher = models
    return train_args(student, teacher, data, out, "--cross_tokenizer", *extra)


def test_a_teacher_of_another_family_is_refused_naming_the_option(capfd, cross_tokenizer_models,
                                                                  cross_tokenizer_data, tmp_path):
    student, teacher = cross_tokenizer_models
    refused(capfd, train.main, train_args(student, teacher, cross_tokenizer_data, tmp_path / "run")[1:],
            "vocabulary differs from the student's", "add --cross_tokenizer")


def test_topk_renormalize_is_refused(capfd, cross_tokenizer_models, cross_tokenizer_data, tmp_path):
    refused(capfd, train.main, cross_args(cross_tokenizer_models, cross_tokenizer_data, tmp_path / "run",
                                          "--topk_renormalize", "--teacher_top_k", "4")[1:],
            "--topk_renormalize does not apply")


def test_what_the_cross_tokenizer_path_does_not_take_is_refused(capfd, cross_tokenizer_models, cross_tokenizer_data,
                                                                 tmp_path, monkeypatch):
    student, teacher = cross_tokenizer_models
    args = train_args(student, teacher, cross_tokenizer_data, tmp_path / "run", "--cross_tokenizer")[1:]
    position = args.index("--teacher_model_name_or_path")
    without_teacher = args[:position] + args[position + 2:]
    refused(capfd, train.main, without_teacher + ["--teacher", f"a={teacher}", "--teacher", f"b={teacher}",
                                                  "--teacher_tokenizer_name_or_path", str(teacher)],
            "each reads its own")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({"format": "gkd-teacher-cache-1"}))
    refused(capfd, train.main, without_teacher + ["--teacher_logits_path", str(tmp_path / "cache"), "--lmbda", "0"],
            "holds the teacher's answers in the student's tokens", "gkd-cache-teacher --cross_tokenizer")
    refused(capfd, train.main, args + ["--teacher_tokenizer_name_or_path", str(student)],
            "a live teacher (--teacher_model_name_or_path) reads its own")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed config sets
    refused(capfd, train.main, without_teacher + ["--teacher", f"a={teacher}", "--teacher", f"b={student}"],
            "does not run under DeepSpeed yet")


def test_a_teacher_without_a_chat_template_is_refused(capfd, cross_tokenizer_models, cross_tokenizer_data, tmp_path):
    student, teacher = cross_tokenizer_models
    plain = tmp_path / "teacher"
    shutil.copytree(teacher, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    refused(capfd, train.main, cross_args((student, plain), cross_tokenizer_data, tmp_path / "run")[1:],
            "has no chat template", "--cross_tokenizer renders the teacher's prompts")


def test_a_conversation_the_teachers_template_rejects_is_refused_naming_the_teacher(capfd, cross_tokenizer_models,
                                                                                    tmp_path):
    student, teacher = cross_tokenizer_models
    strict = tmp_path / "teacher"
    shutil.copytree(teacher, strict)
    template = strict / "chat_template.jinja"
    template.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}" + template.read_text())
    data = tmp_path / "system.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    refused(capfd, train.main, cross_args((student, strict), data, tmp_path / "run", "--lmbda", "0")[1:],
            "system.jsonl:1", "the teacher's chat template rejected this conversation")


def test_plain_text_is_refused_naming_the_record(capfd, cross_tokenizer_models, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"plain text document number {i} of a few words"}) + "\n"
                            for i in range(3)))
    refused(capfd, train.main, cross_args(cross_tokenizer_models, data, tmp_path / "run", "--lmbda", "0")[1:],
            "text.jsonl:1", "plain text, which --cross_tokenizer cannot align")


# seed 2 with lmbda 0.5: step 1 on the dataset's responses, step 2 on the student's samples (test_steps.py)
MIXED = ("--lmbda", "0.5", "--seed", "2", "--teacher_top_k", "5", "--per_device_train_batch_size", "4")


@pytest.fixture(scope="module")
def live_run(cross_tokenizer_models, cross_tokenizer_data, tmp_path_factory):
    """With an evaluation every step, which must leave the training steps' metrics as they are (the served run
    below, without one, is compared with this one)."""
    out = tmp_path_factory.mktemp("cross_live") / "run"
    evaluation = ("--eval_dataset_name", cross_tokenizer_data, "--eval_strategy", "steps", "--eval_steps", "1")
    return run_cli(cross_args(cross_tokenizer_models, cross_tokenizer_data, out, *MIXED, *evaluation)), out


def test_a_run_across_tokenizers_trains_logs_the_alignment_and_saves_a_loadable_model(live_run):
    result, out = live_run
    assert_ok(result)
    assert "have a byte-identical teacher token" in result.stderr
    steps = metrics(out)
    assert [step["on_policy"] for step in steps] == [0, 1]
    for step in steps:
        assert 0 < step["aligned_byte_share"] < 1  # digits against packed numbers: not everything is 1:1
        assert step["chunks_per_completion"] > 1 and step["aligned_completions"] == 1
        assert "chunk_reverse_kl" in step and step["kd_loss"] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_a_served_teacher_with_its_own_tokenizer_gives_the_live_teachers_losses(capfd, cross_tokenizer_models,
                                                                                 cross_tokenizer_data, live_run,
                                                                                 tmp_path):
    student, teacher = cross_tokenizer_models
    process, url = start_server(teacher, "--max_logprobs", "5")
    try:
        out = tmp_path / "run"
        args = train_args(student, teacher, cross_tokenizer_data, out, "--cross_tokenizer", *MIXED)
        position = args.index("--teacher_model_name_or_path")
        args[position:position + 2] = ["--teacher_server_url", url, "--teacher_tokenizer_name_or_path", str(teacher)]
        wrong = list(args)
        wrong[wrong.index("--teacher_tokenizer_name_or_path") + 1] = str(student)
        refused(capfd, train.main, wrong[1:], "not the tokenizer of the model", "serves")
        assert_ok(run_cli(args))
    finally:
        process.terminate()
        process.wait(timeout=30)
    served, live = metrics(out), metrics(live_run[1])
    assert [step["on_policy"] for step in served] == [0, 1]
    for ours, theirs in zip(served, live):
        assert ours["kd_loss"] == pytest.approx(theirs["kd_loss"], rel=1e-3)
        assert ours["aligned_byte_share"] == theirs["aligned_byte_share"]


def test_a_cache_in_the_teachers_tokens_gives_the_live_teachers_losses(capfd, cross_tokenizer_models,
                                                                      cross_tokenizer_data, live_run, tmp_path):
    """Built once in the teacher's tokens (its prompts, its tokenization of each response) and aligned when the run
    reads it: the live teacher's off-policy step, to float16's precision; the teacher's tokenizer travels with it."""
    student, teacher = cross_tokenizer_models
    cache = tmp_path / "cache"
    result = run_cli(["-m", "gkd.tools.cache_teacher", "--cross_tokenizer", "--teacher_model_name_or_path", teacher,
                      "--tokenizer_name_or_path", student, "--dataset_name", cross_tokenizer_data, "--top_k", "8",
                      "--output_dir", cache, "--max_length", "96", "--max_new_tokens", "8", "--shard_size", "5"])
    assert_ok(result)
    assert "of completion bytes in 1:1 chunks" in result.stderr
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["identity"]["teacher_tokenizer_fingerprint"] != manifest["identity"]["tokenizer_fingerprint"]
    assert (cache / manifest["teacher_tokenizer"] / "tokenizer.json").is_file()
    out = tmp_path / "run"
    args = cross_args(cross_tokenizer_models, cross_tokenizer_data, out, *MIXED)
    position = args.index("--teacher_model_name_or_path")
    args[position:position + 2] = ["--teacher_logits_path", str(cache)]
    args[args.index("--lmbda") + 1] = "0"  # a cache answers the dataset's responses only
    args[args.index("--max_steps") + 1] = "1"
    assert_ok(run_cli(args))
    (cached,), live = metrics(out), metrics(live_run[1])[0]
    assert live["on_policy"] == 0 and cached["kd_loss"] == pytest.approx(live["kd_loss"], rel=2e-3)
    assert cached["aligned_byte_share"] == live["aligned_byte_share"] and 0 < cached["aligned_byte_share"] < 1
    args.remove("--cross_tokenizer")
    refused(capfd, train.main, args[1:] + ["--overwrite_output_dir"], "was built in the teacher's own tokens",
            "train with --cross_tokenizer")
    shutil.rmtree(cache / manifest["teacher_tokenizer"])
    refused(capfd, train.main, args[1:] + ["--cross_tokenizer", "--overwrite_output_dir"],
            "the teacher's tokenizer (teacher_tokenizer/) is missing", "--teacher_tokenizer_name_or_path")


def routed_args(models, data, out, digits_source, tmp_path) -> list[str]:
    """Two teachers across tokenizers: records alternate between "digits" (the teacher of the other tokenizer, from
    `digits_source`) and "packs" (the student's own weights and tokenizer)."""
    student, _ = models
    records = [json.loads(line) for line in data.read_text().splitlines()]
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({**record, "teacher": "digits" if number % 2 else "packs"}) + "\n"
                              for number, record in enumerate(records)))
    args = cross_args(models, routed, out, *MIXED)
    position = args.index("--teacher_model_name_or_path")
    args[position:position + 2] = ["--teacher", f"digits={digits_source}", "--teacher", f"packs={student}"]
    return args


@pytest.fixture(scope="module")
def two_families_run(cross_tokenizer_models, cross_tokenizer_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_families")
    result = run_cli(routed_args(cross_tokenizer_models, cross_tokenizer_data, folder / "run",
                                 cross_tokenizer_models[1], folder))
    return result, folder / "run"


def test_two_teachers_of_two_families_each_teach_their_own_records(two_families_run):
    """--cross_tokenizer with --teacher NAME=SOURCE: records naming "digits" are rendered for and scored by the
    teacher of the other tokenizer, those naming "packs" by the student's own weights (its tokenizer, through the same
    byte path), which must find no divergence on the dataset's responses; each logs its own alignment and loss."""
    result, out = two_families_run
    assert_ok(result)
    assert result.stderr.count("have a byte-identical teacher token") == 2
    first, second = metrics(out)
    assert (first["on_policy"], second["on_policy"]) == (0, 1)
    assert first["kd_loss/packs"] == pytest.approx(0, abs=1e-5) and first["aligned_byte_share/packs"] == 1
    assert first["kd_loss/digits"] > 0.1 and 0 < first["aligned_byte_share/digits"] < 1
    for step in (first, second):
        assert step["kd_tokens/packs"] > 0 and step["kd_tokens/digits"] > 0


def test_a_served_teacher_among_several_reads_the_tokenizer_its_server_names(cross_tokenizer_models,
                                                                            cross_tokenizer_data, two_families_run,
                                                                            tmp_path):
    """The "digits" teacher served over HTTP, no tokenizer option: its tokenizer is the model the server reports
    (`root` of /v1/models), and the run's losses are the live teachers' run's."""
    process, url = start_server(cross_tokenizer_models[1], "--max_logprobs", "5")
    try:
        out = tmp_path / "run"
        assert_ok(run_cli(routed_args(cross_tokenizer_models, cross_tokenizer_data, out, url, tmp_path)))
    finally:
        process.terminate()
        process.wait(timeout=30)
    for served, live in zip(metrics(out), metrics(two_families_run[1])):
        for key in ("kd_loss/digits", "kd_loss/packs"):
            assert served[key] == pytest.approx(live[key], rel=1e-3, abs=1e-6)
        assert served["aligned_byte_share/digits"] == live["aligned_byte_share/digits"]


def test_the_teacher_writes_completions_in_its_tokens_for_the_student(cross_tokenizer_models, cross_tokenizer_data,
                                                                      tmp_path):
    """--seq_kd: the teacher continues its own prompt with its own stop tokens; the student trains on the text."""
    out = tmp_path / "run"
    result = run_cli(cross_args(cross_tokenizer_models, cross_tokenizer_data, out, "--lmbda", "0", "--seq_kd",
                                "--teacher_top_k", "5"))
    assert_ok(result)
    steps = metrics(out)
    assert [step["teacher_generated"] for step in steps] == [1, 1]
    assert all(step["completion_tokens"] > 0 and step["aligned_completions"] == 1 for step in steps)


@pytest.mark.slow
def test_the_sampled_reverse_kl_to_a_teacher_with_another_tokenizer_falls(cross_tokenizer_models,
                                                                          cross_tokenizer_data, tmp_path):
    """Every step on the student's own samples, reverse KL: the student moves toward a fixed teacher it shares no
    tokenizer with, measured by the sampled estimate over all chunks (1:1 and m:n)."""
    out = tmp_path / "run"
    result = run_cli(cross_args(cross_tokenizer_models, cross_tokenizer_data, out, "--lmbda", "1", "--beta", "1",
                                "--max_steps", "30", "--per_device_train_batch_size", "8", "--max_new_tokens", "16",
                                "--learning_rate", "3e-3"), timeout=600)
    assert_ok(result)
    estimates = [step["chunk_reverse_kl"] for step in metrics(out)]
    first, last = statistics.mean(estimates[:6]), statistics.mean(estimates[-6:])
    assert last < 0.7 * first, estimates


@pytest.mark.distributed
def test_two_zero3_ranks_distill_across_tokenizers(cross_tokenizer_models, cross_tokenizer_data, tmp_path):
    out = tmp_path / "run"
    result = launch("zero3.yaml", cross_args(cross_tokenizer_models, cross_tokenizer_data, out, "--lmbda", "0.5",
                                             "--seed", "2", "--teacher_top_k", "5"))
    assert_ok(result)
    steps = metrics(out)
    assert [step["on_policy"] for step in steps] == [0, 1]
    assert all(step["aligned_byte_share"] > 0 for step in steps)
