"""The teacher's signal three ways, through the real command lines: a live teacher's top-K, a top-K cache built once
(`gkd-cache-teacher`), and a served teacher over HTTP (`gkd-teacher-serve`, the subset of vLLM's API gkd uses). The
three give the same losses for the same samples; a cache or server that does not fit the run is refused in one line;
a server that goes away mid-run stops it with a checkpoint."""

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from helpers import CLI_ENV, REPO, assert_ok, default_signals, metrics, run_cli, train_args

from gkd import train
from gkd.checkpoints import checkpoint_problem

pytestmark = pytest.mark.subprocess
TOP_K = 8


def start_server(teacher, *extra) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "gkd.tools.teacher_server", "--model_name_or_path", str(teacher), "--port", "0",
               *map(str, extra)]
    process = subprocess.Popen(command, cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, preexec_fn=default_signals)
    line = process.stdout.readline()  # "serving ... at http://127.0.0.1:PORT (the OpenAI API under /v1 ..."
    match = re.search(r"(http://[\d.]+:\d+)", line)
    assert match, line
    return process, match.group(1)


@pytest.fixture(scope="module")
def server(tiny_models):
    process, url = start_server(tiny_models[1])
    yield url
    process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def cache(tiny_models, chat_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher_cache") / "cache"
    result = run_cli(["-m", "gkd.tools.cache_teacher", "--teacher_model_name_or_path", tiny_models[1],
                      "--tokenizer_name_or_path", tiny_models[0], "--dataset_name", chat_data, "--top_k", TOP_K,
                      "--output_dir", folder, "--max_length", "96", "--max_new_tokens", "8", "--shard_size", "3"])
    assert_ok(result)
    return folder


def losses_of(output_dir) -> list[float]:
    return [m["loss"] for m in metrics(output_dir)]


def without_live_teacher(args: list[str]) -> list[str]:
    """A training command with its --teacher_model_name_or_path removed (a cache or a server takes its place)."""
    position = args.index("--teacher_model_name_or_path")
    return args[:position] + args[position + 2:]


def test_cache_server_and_live_top_k_give_the_same_losses(tiny_models, chat_data, server, cache, tmp_path):
    student, teacher = tiny_models
    common = ["--lmbda", "0", "--beta", "0.5", "--seed", "1", "--max_steps", "3"]
    assert_ok(run_cli(train_args(student, teacher, chat_data, tmp_path / "live", *common, "--teacher_top_k", TOP_K)))
    assert_ok(run_cli(without_live_teacher(train_args(student, teacher, chat_data, tmp_path / "cached", *common,
                                                      "--teacher_logits_path", cache))))
    assert_ok(run_cli(without_live_teacher(train_args(student, teacher, chat_data, tmp_path / "served", *common,
                                                      "--teacher_server_url", server, "--teacher_top_k", TOP_K))))
    reference = losses_of(tmp_path / "live")
    assert len(reference) == 3 and all(loss > 0 for loss in reference)
    # The cache stores float16 log-probabilities: the same losses to float16's precision.
    assert losses_of(tmp_path / "cached") == pytest.approx(reference, rel=2e-3)
    assert losses_of(tmp_path / "served") == pytest.approx(reference, rel=1e-5)
    assert all("kd_loss" in m for m in metrics(tmp_path / "cached"))


def test_a_served_teacher_writes_completions_and_scores_the_students(tiny_models, chat_data, server, tmp_path):
    student, _ = tiny_models

    def served(out, *extra):
        return without_live_teacher(train_args(student, "unused", chat_data, out, "--teacher_server_url", server,
                                               *extra))

    assert_ok(run_cli(served(tmp_path / "seqkd", "--lmbda", "0.5", "--seq_kd", "true", "--teacher_top_k", "4",
                             "--seed", "2", "--sft_loss_weight", "0.4")))
    logged = metrics(tmp_path / "seqkd")
    assert [m["teacher_generated"] for m in logged] == [1, 0] and [m["on_policy"] for m in logged] == [0, 1]
    assert "sft_loss" in logged[0] and logged[0]["sft_loss"] > 0  # teacher completions get the SFT term
    assert_ok(run_cli(served(tmp_path / "sampled", "--lmbda", "1", "--beta", "1", "--teacher_top_k", "1")))
    assert all(m["on_policy"] == 1 and m["loss"] >= 0 for m in metrics(tmp_path / "sampled"))


def test_a_cache_that_does_not_fit_the_run_is_refused(capfd, tiny_models, chat_data, cache, tmp_path):
    from test_hostile import refused

    student, _ = tiny_models

    def from_cache(folder, *extra):
        return without_live_teacher(train_args(student, "x", chat_data, tmp_path / "out", "--teacher_logits_path",
                                               folder, "--lmbda", "0", *extra))[1:]

    refused(capfd, train.main, from_cache(cache, "--lmbda", "0.5"), "cannot score the student's samples")
    refused(capfd, train.main, from_cache(cache, "--max_length", "80"), "max_length differs")
    refused(capfd, train.main, from_cache(cache, "--teacher_top_k", "9"), "holds only the top 8")
    edited = tmp_path / "edited.jsonl"
    edited.write_text(chat_data.read_text().replace("paris", "lyon"))
    args = from_cache(cache)
    args[args.index("--dataset_name") + 1] = str(edited)
    refused(capfd, train.main, args, "data differs", "another dataset, or edited records")
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shutil.rmtree(broken / "shard-00001")
    refused(capfd, train.main, from_cache(broken), "shard-00001 cannot be read")
    (broken / "cache.json").unlink()
    refused(capfd, train.main, from_cache(broken), "not a finished teacher cache")


def test_a_killed_cache_build_resumes_from_its_complete_shards(tiny_models, chat_data, cache, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    manifest = json.loads((folder / "cache.json").read_text())
    (folder / "cache.json").unlink()  # killed before the end: two complete shards, one half-written
    shutil.rmtree(folder / "shard-00002")
    (folder / ".shard-00002.partial-1").mkdir()
    (folder / "cache.partial.json").write_text(json.dumps({
        "identity": manifest["identity"], "top_k": TOP_K, "storage_dtype": "float16", "shard_size": 3,
        "teacher": str(tiny_models[1]), "teacher_revision": "main"}))
    kept = (folder / "shard-00000").stat().st_mtime_ns
    result = run_cli(["-m", "gkd.tools.cache_teacher", "--teacher_model_name_or_path", tiny_models[1],
                      "--tokenizer_name_or_path", tiny_models[0], "--dataset_name", chat_data, "--top_k", TOP_K,
                      "--output_dir", folder, "--max_length", "96", "--max_new_tokens", "8", "--shard_size", "3"])
    assert_ok(result)
    assert "2 shards already complete" in result.stderr
    assert (folder / "shard-00000").stat().st_mtime_ns == kept and not list(folder.glob(".shard-*"))
    assert json.loads((folder / "cache.json").read_text())["shards"] == manifest["shards"]


def test_a_server_that_cannot_serve_the_run_is_refused(capfd, tiny_models, chat_data, server, tmp_path):
    from test_hostile import refused
    from tiny import make_tokenizer

    student, _ = tiny_models

    def served(url, *extra):
        return without_live_teacher(train_args(student, "x", chat_data, tmp_path / "out", "--teacher_server_url", url,
                                               "--lmbda", "0", *extra))[1:]

    refused(capfd, train.main, served(server), "needs --teacher_top_k")
    refused(capfd, train.main, served(server, "--teacher_top_k", "50"), "cannot give 50 log-probabilities",
            "--max-logprobs 50")
    make_tokenizer(tmp_path / "other_tokenizer", vocab_size=280)
    refused(capfd, train.main, served(server, "--teacher_top_k", "4", "--teacher_tokenizer_name_or_path",
                                      tmp_path / "other_tokenizer"), "vocabulary differs")
    refused(capfd, train.main, served("http://127.0.0.1:9", "--teacher_top_k", "4", "--teacher_server_retries", "0"),
            "failed 1 times", "Connection refused")


def test_a_server_that_goes_away_mid_run_stops_it_with_a_checkpoint(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    process, url = start_server(teacher)
    out = tmp_path / "run"
    args = without_live_teacher(train_args(student, "x", chat_data, out, "--teacher_server_url", url,
                                           "--teacher_top_k", "4", "--lmbda", "0", "--max_steps", "100000",
                                           "--teacher_server_retries", "1"))
    training = subprocess.Popen([sys.executable, *args], cwd=REPO, env=CLI_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and training.poll() is None and not (
                (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
            time.sleep(0.2)
    finally:
        process.kill()
        process.communicate()
    _, stderr = training.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert training.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    step = int(re.search(r"checkpoint-(\d+)", lines[0]).group(1))
    assert step >= 2 and "--resume_from_checkpoint last" in lines[0]
    assert checkpoint_problem(out / f"checkpoint-{step}") is None
    assert len(metrics(out)) == step  # no step trained on missing teacher data


def test_multi_rank_cache_build_splits_the_shards(tiny_models, chat_data, cache, tmp_path):
    """Two DeepSpeed CPU ranks: each scores its share of the shards; the cache equals the one-process cache."""
    folder = tmp_path / "cache"
    result = run_cli(["--config_file", "ds_configs/zero2.yaml", "--num_processes", "2", "--main_process_port", "0",
                      "-m", "gkd.tools.cache_teacher", "--teacher_model_name_or_path", tiny_models[1],
                      "--tokenizer_name_or_path", tiny_models[0], "--dataset_name", chat_data, "--top_k", TOP_K,
                      "--output_dir", folder, "--max_length", "96", "--max_new_tokens", "8", "--shard_size", "3"],
                     launcher=[sys.executable, "-m", "accelerate.commands.launch"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caching the teacher (rank 0)" in result.stderr and "5/5" in result.stderr  # shards 0 and 2 of 3
    ours, reference = (json.loads((path / "cache.json").read_text()) for path in (folder, cache))
    assert ours["shards"] == reference["shards"] and ours["identity"] == reference["identity"]
