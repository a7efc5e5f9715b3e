"""gkd/config.py through the training CLI's parser, in process: what a command line makes of options that depend on
each other (no model, no data is read)."""

import pytest

from gkd.errors import ConfigError
from gkd.train import parse_args


def parse(tmp_path, *options):
    argv = ["--model_name_or_path", "student", "--teacher_model_name_or_path", "teacher", "--dataset_name",
            "data.jsonl", "--output_dir", tmp_path / "out", "--report_to", "none", *options]
    return parse_args([str(arg) for arg in argv])[2]


def refused(tmp_path, *options) -> str:
    with pytest.raises(ConfigError) as raised:
        parse(tmp_path, *options)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("options,named", [
    (["--kd_ratio", "0.5", "--sft_loss_weight", "0.4"], ["--kd_ratio 0.5", "--sft_loss_weight 0.4"]),
    (["--kd_ratio", "0.5", "--sft_loss_weight", "0"], ["--kd_ratio 0.5", "--sft_loss_weight 0"]),  # a given default
    (["--kd_ratio", "0.5", "--kd_loss_weight", "1"], ["--kd_ratio 0.5", "--kd_loss_weight 1"]),
    (["--objective", "sft", "--kd_ratio", "0.7"], ["--objective sft", "--kd_ratio 0.7"]),
    (["--objective", "sft", "--kd_loss_weight", "0.3"], ["--objective sft", "--kd_loss_weight 0.3"]),
    (["--objective", "sft", "--sft_loss_weight", "0.5"], ["--objective sft", "--sft_loss_weight 0.5"]),
    (["--objective", "sft", "--lmbda", "0.5"], ["--objective sft", "--lmbda 0.5", "on-policy"]),
])
def test_options_that_contradict_a_shorthand_are_refused_naming_both(tmp_path, options, named):
    message = refused(tmp_path, *options)
    for text in named:
        assert text in message, (text, message)


def test_a_conflict_given_in_a_yaml_config_is_refused_too(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("kd_ratio: 0.5\n")
    message = refused(tmp_path, "--config", config, "--sft_loss_weight", "0.4")
    assert "--kd_ratio 0.5" in message and "--sft_loss_weight 0.4" in message
    config.write_text("lmbda: 0.5\n")  # the default value, given: the user asked for on-policy steps
    message = refused(tmp_path, "--config", config, "--objective", "sft")
    assert "--objective sft" in message and "--lmbda 0.5" in message


@pytest.mark.parametrize("options,expected", [
    ([], {"lmbda": 0.5, "kd_loss_weight": 1.0, "sft_loss_weight": 0.0, "kd_ratio": None}),
    (["--objective", "sft"], {"lmbda": 0.0, "kd_loss_weight": 0.0, "sft_loss_weight": 1.0}),
    (["--objective", "sft", "--lmbda", "0", "--seq_kd", "true"], {"lmbda": 0.0, "kd_loss_weight": 0.0}),
    (["--kd_ratio", "0.7"], {"kd_loss_weight": 0.7, "sft_loss_weight": pytest.approx(0.3), "lmbda": 0.5}),
    (["--kd_ratio", "0.7", "--sft_loss_weight", "0.3"], {"kd_loss_weight": 0.7, "sft_loss_weight": 0.3}),
    (["--kd_loss_weight", "1", "--sft_loss_weight", "0.4"], {"kd_loss_weight": 1.0, "sft_loss_weight": 0.4}),
])
def test_shorthands_set_what_was_left_out(tmp_path, options, expected):
    args = parse(tmp_path, *options)
    assert {name: getattr(args, name) for name in expected} == expected


def test_a_resolved_config_resolves_to_itself(tmp_path):
    """Rebuilt from its own values (a copy, a to_dict round trip), a config meets no conflict of its own making."""
    from gkd.config import GKDConfig

    for options in (["--objective", "sft"], ["--kd_ratio", "0.7"]):
        args = parse(tmp_path, *options)
        again = GKDConfig(**{name: getattr(args, name) for name in (
            "output_dir", "report_to", "objective", "kd_ratio", "kd_loss_weight", "sft_loss_weight", "lmbda")})
        assert (again.kd_loss_weight, again.sft_loss_weight, again.lmbda) == (
            args.kd_loss_weight, args.sft_loss_weight, args.lmbda)


def test_sft_with_on_policy_steps_from_a_schedule_is_refused(tmp_path):
    message = refused(tmp_path, "--objective", "sft", "--lmbda_schedule", "linear", "--lmbda_start", "0.5",
                      "--lmbda_warmup_steps", "3")
    assert "--lmbda_start 0.5" in message and "--objective sft" in message and "on-policy" in message


@pytest.mark.parametrize("options,named", [
    (["--lmbda", "1", "--lmbda_warmup_steps", "5", "--lmbda_start", "0"], ["--lmbda_warmup_steps 5"]),
    (["--lmbda_start", "0.3"], ["--lmbda_start 0.3"]),
])
def test_a_warmup_or_start_without_a_schedule_is_refused(tmp_path, options, named):
    message = refused(tmp_path, *options)
    assert "add --lmbda_schedule linear or step" in message
    for text in named:
        assert text in message, (text, message)


def test_text_prompt_and_completion_must_fit_in_max_length(tmp_path):
    message = refused(tmp_path, "--text_prompt_tokens", "125", "--max_length", "128", "--max_new_tokens", "8")
    for text in ("--text_prompt_tokens 125", "--max_new_tokens 8", "--max_length 128", "133"):
        assert text in message, (text, message)
    assert parse(tmp_path, "--text_prompt_tokens", "120", "--max_length", "128", "--max_new_tokens", "8")


@pytest.mark.parametrize("options,on_policy,off_policy", [
    ([], True, True),
    (["--lmbda", "0"], False, True),
    (["--lmbda", "1"], True, False),
    (["--lmbda", "0", "--lmbda_schedule", "step", "--lmbda_start", "1", "--lmbda_warmup_steps", "2"], True, True),
    (["--lmbda", "0", "--lmbda_schedule", "linear", "--lmbda_start", "0.2", "--lmbda_warmup_steps", "4"], True, True),
    (["--lmbda", "1", "--lmbda_schedule", "step", "--lmbda_warmup_steps", "2"], True, True),
    (["--lmbda", "1", "--lmbda_schedule", "linear", "--lmbda_start", "1", "--lmbda_warmup_steps", "2"], True, False),
])
def test_one_definition_of_on_policy_and_off_policy_steps(tmp_path, options, on_policy, off_policy):
    args = parse(tmp_path, *options)
    assert (args.has_on_policy_steps, args.has_off_policy_steps) == (on_policy, off_policy)


def test_a_cache_refuses_on_policy_steps_from_a_schedule(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    argv = ["--model_name_or_path", "student", "--teacher_logits_path", cache, "--dataset_name", "data.jsonl",
            "--output_dir", tmp_path / "out", "--report_to", "none", "--lmbda", "0", "--lmbda_schedule", "step",
            "--lmbda_start", "1", "--lmbda_warmup_steps", "2"]
    with pytest.raises(ConfigError, match="cannot score the student's samples .*--lmbda_start 1"):
        parse_args([str(arg) for arg in argv])


def test_a_live_teachers_top_k_above_the_vocabulary_is_refused_before_any_weight_loads(tiny_models, chat_data,
                                                                                       tmp_path, capfd):
    """It was `RuntimeError: selected index k out of range` at the first step, after both models had loaded."""
    from helpers import train_args

    from gkd import train
    from gkd.cli import run

    argv = train_args(*tiny_models, chat_data, tmp_path / "out", "--teacher_top_k", "60000")[1:]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: train.main(argv), process_exit=False)
    stderr = capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Loading weights" not in stderr and "tokenizing" not in stderr, stderr[-3000:]
    assert "--teacher_top_k 60000 is more than the 300 tokens" in lines[0], lines[0]


# ---------------------------------------------------------------- several teachers (--teacher NAME=SOURCE)


def model_options(tmp_path, *options):
    from gkd.cli import parse as parse_options
    from gkd.config import ModelArguments

    return parse_options(ModelArguments, ["--model_name_or_path", "student", *map(str, options)])[0]


def test_several_teachers_are_named_sources_of_each_kind_on_the_command_line_or_in_yaml(tmp_path):
    cache = tmp_path / "caches" / "code"
    cache.mkdir(parents=True)
    (cache / "cache.json").write_text("{}")
    model_args = model_options(tmp_path, "--teacher", "math=Qwen/Qwen3-8B", "--teacher", "chat=http://host:8000",
                               "--teacher", f"code={cache}", "--default_teacher", "chat")
    assert [(spec.name, spec.kind) for spec in model_args.teacher_specs] == [
        ("math", "live"), ("chat", "server"), ("code", "cache")]
    assert model_args.for_teacher(model_args.teacher_specs[2]).teacher_logits_path == str(cache)
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  - math=Qwen/Qwen3-8B\n  - chat=http://host:8000\n")
    assert model_options(tmp_path, "--config", config).teacher == ["math=Qwen/Qwen3-8B", "chat=http://host:8000"]
    # flags replace the file's list, as every other option does
    assert model_options(tmp_path, "--config", config, "--teacher", "code=T").teacher == ["code=T"]


@pytest.mark.parametrize("options,expected", [
    (["--teacher", "a=T", "--teacher_model_name_or_path", "T"], "or one (--teacher_model_name_or_path), not both"),
    (["--teacher", "a=T", "--teacher_logits_path", "C"], "not both"),
    (["--teacher", "a=T", "--teacher", "a=U"], "--teacher a is given twice"),
    (["--teacher", "T"], "--teacher T: expected NAME=SOURCE"),
    (["--teacher", "a=T", "--default_teacher", "b"], "--default_teacher b is none of the teachers (a)"),
    (["--teacher_model_name_or_path", "T", "--default_teacher", "b"], "--default_teacher names one of several"),
])
def test_malformed_teachers_are_refused_in_one_line(tmp_path, options, expected):
    with pytest.raises(ConfigError) as raised:
        model_options(tmp_path, *options)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_each_teacher_is_checked_as_the_runs_one_and_named(tmp_path):
    """What a cache cannot do (on-policy steps) is refused naming the teacher that is the cache."""
    cache = tmp_path / "code"
    cache.mkdir()
    (cache / "cache.json").write_text("{}")
    argv = ["--model_name_or_path", "student", "--teacher", "math=T", "--teacher", f"code={cache}", "--dataset_name",
            "data.jsonl", "--output_dir", tmp_path / "out", "--report_to", "none", "--lmbda", "0.5"]
    with pytest.raises(ConfigError, match=r"^--teacher code: --teacher_logits_path holds"):
        parse_args([str(arg) for arg in argv])
    parse_args([str(arg) for arg in argv[:-2]] + ["--lmbda", "0"])


def test_the_options_module_imports_no_cli_generation_or_launch_code():
    """config.py holds options and their checks: importing it brings in no command-line, sampling or launch code."""
    import subprocess
    import sys

    probe = ("import sys, gkd.config; print(sorted(m for m in sys.modules if m.startswith('gkd')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    for module in ("gkd.cli", "gkd.generation", "gkd.decoding", "gkd.launch"):
        assert f"'{module}'" not in loaded, loaded
