"""The teacher's signal three ways, through the real command lines: a live teacher's top-K, a top-K cache built once
(`gkd-cache-teacher`), and a served teacher over HTTP (`gkd-teacher-serve`, the subset of vLLM's API gkd uses). The
three give the same losses for the same samples; a cache or server that does not fit the run is refused in one line;
a server that goes away mid-run stops it with a checkpoint."""

import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import (CLI_ENV, REPO, assert_ok, default_signals, metrics, run_cli, train_args,
                     train_until_a_server_is_lost)

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
    from helpers import refused

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


def test_a_sample_whose_tokens_differ_from_the_cached_ones_is_refused(tiny_models, cache):
    """The identity covers data, tokenizer and options; the tokens themselves are checked as each batch is read (a
    cache in the teacher's tokens is compared with the run's own tokenization of the same text)."""
    import torch

    from gkd.errors import ConfigError
    from gkd.teachers.cache import TeacherCache

    store = TeacherCache(cache, 64)
    cached = torch.tensor(store.rows[1]["completion_ids"].tolist())
    batch = {"index": torch.tensor([1]), "completion_ids": cached[None],
             "completion_mask": torch.ones(1, len(cached), dtype=torch.long)}
    assert store.targets(batch).ids.shape == (len(cached), store.top_k)
    batch["completion_ids"] = (cached + 1)[None]
    with pytest.raises(ConfigError, match="sample 1 was cached with other tokens"):
        store.targets(batch)


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
    from helpers import refused
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


@contextlib.contextmanager
def misbehaving_server(root, answer_post, max_model_len: int = 2048, answer_models=None):
    """A stdlib HTTP server on 127.0.0.1 in this process, speaking (some of) vLLM's API: GET /v1/models names `root` as
    its model (or is answered by `answer_models(handler)`), each POST /v1/completions by `answer_post(handler, body)`.
    Yields its URL and the arrival times of its requests."""
    arrivals = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            arrivals.append(time.monotonic())
            if answer_models:
                return answer_models(self)
            card = {"id": "fake", "object": "model", "root": str(root), "max_model_len": max_model_len}
            self.send(200, json.dumps({"object": "list", "data": [card]}).encode())

        def do_POST(self):
            arrivals.append(time.monotonic())
            answer_post(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        def send(self, status: int, data: bytes, content_type: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", arrivals
    finally:
        server.shutdown()
        server.server_close()


def prompt_logprobs(body: dict, edit=lambda entry: entry) -> bytes:
    """A scoring answer in vLLM's shape (ranks 1..K, then the own token), each completion-side entry passed through
    `edit`."""
    choices = []
    for index, prompt in enumerate(body["prompt"]):
        entries = [None]
        for token in prompt[1:]:
            entry = {str(i): {"logprob": -1.0 - i, "rank": i + 1, "decoded_token": "t"}
                     for i in range(body["prompt_logprobs"])}
            entry.setdefault(str(token), {"logprob": -30.0, "rank": 200, "decoded_token": "t"})
            entries.append(edit(entry))
        choices.append({"index": index, "text": "", "finish_reason": "length", "prompt_logprobs": entries})
    return json.dumps({"object": "text_completion", "choices": choices}).encode()


def with_entry(token_id: str, log_prob: float, rank: int = 2):
    return lambda entry: {**entry, token_id: {"logprob": log_prob, "rank": rank, "decoded_token": "t"}}


BROKEN_ANSWERS = {  # what the server does to each entry -> what the one error line must say
    "fewer than K": (lambda entry: dict(list(entry.items())[:2]), "2 log-probabilities ranked 1..8, asked for 8"),
    "-inf": (with_entry("3", float("-inf")), "logprob -inf, not a log-probability"),
    "NaN": (with_entry("3", float("nan")), "logprob nan, not a log-probability"),
    "positive": (with_entry("3", 0.5), "logprob 0.5, not a log-probability"),
    "id beyond the vocabulary": (with_entry("123456", -2.0), "token id 123456 is outside the served model's"),
    "negative id": (with_entry("-1", -2.0), "token id -1 is outside"),
    "no own token": (lambda entry: {**{key: value for key, value in entry.items() if key != "0"},
                                    "50": {"logprob": -0.5, "rank": 1, "decoded_token": "t"}},
                     "no log-probability for the token itself"),
}


def test_a_server_whose_answers_break_the_contract_is_refused(capfd, tiny_models, chat_data, tmp_path):
    """Every answer is checked (count, shape, finite log-probabilities <= 0, ids in the vocabulary), and one that
    breaks vLLM's contract is an error naming the server and what was wrong, at once, not retried; so is an answer
    that is not JSON. A context of exactly --max_length is one token short."""
    from helpers import refused

    student, teacher = tiny_models
    broken = {"edit": None}

    def answer(handler, body):
        if broken["edit"] == "html":
            return handler.send(200, b"<!DOCTYPE html>\n<html><body>Welcome to nginx!</body></html>", "text/html")
        handler.send(200, prompt_logprobs(body, broken["edit"] or (lambda entry: entry)))

    def served(url, *extra):
        return without_live_teacher(train_args(student, "x", chat_data, tmp_path / "out", "--teacher_server_url", url,
                                               "--lmbda", "0", "--teacher_top_k", TOP_K, *extra))[1:]

    with misbehaving_server(teacher, answer) as (url, arrivals):
        for name, (edit, expected) in BROKEN_ANSWERS.items():
            broken["edit"] = edit
            line = refused(capfd, train.main, served(url), f"{url}/v1/completions", expected)
            assert "failed" not in line, (name, line)  # not retried
        broken["edit"] = "html"
        arrivals.clear()
        line = refused(capfd, train.main, served(url, "--teacher_server_retries", "5"), f"{url}/v1/completions",
                       "not JSON", "not an OpenAI-compatible server", "'<!DOCTYPE html>\\n<html><body>Welcome")
        assert len(arrivals) == 2, line  # /v1/models and one probe: no retry
    with misbehaving_server(teacher, answer, max_model_len=96) as (url, _):
        refused(capfd, train.main, served(url), "max_model_len 96", "needs max_model_len >= max_length + 1")


def trickle(handler, *_):
    """Headers at once, then a long body one byte every half second (a server that has stalled, not died)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    try:
        for _ in range(240):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.5)
    except OSError:  # the client hung up
        pass


def trickle_headers(handler, *_):
    """The status line and headers themselves, one byte every half second."""
    try:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"x" * 200:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.5)
    except OSError:
        pass
    handler.close_connection = True


@pytest.mark.parametrize("stall", ["models answer's body", "probe's headers"])
def test_a_trickling_server_times_out_within_the_timeout(capfd, tiny_models, chat_data, tmp_path, stall):
    """--teacher_server_timeout bounds a whole request, not each read: a server that sends a byte every 0.5 s fails
    the request (the describe call or the probe) after the timeout, then the retry path runs."""
    from helpers import refused

    student, teacher = tiny_models
    timeout = 2
    if stall == "models answer's body":
        server = misbehaving_server(teacher, None, answer_models=trickle)
    else:
        server = misbehaving_server(teacher, trickle_headers)
    args = without_live_teacher(train_args(student, "x", chat_data, tmp_path / "out", "--lmbda", "0",
                                           "--teacher_top_k", "4", "--teacher_server_timeout", timeout,
                                           "--teacher_server_retries", "0", "--teacher_server_url", "URL"))[1:]
    with server as (url, arrivals):
        args[args.index("URL")] = url
        refused(capfd, train.main, args, "failed 1 times", f"no complete answer within {timeout} s")
        waited = time.monotonic() - arrivals[-1]
    assert timeout - 0.1 < waited < timeout + 3, waited


def test_a_server_that_goes_away_mid_run_stops_it_with_a_checkpoint(tiny_models, chat_data, tmp_path):
    student, teacher = tiny_models
    process, url = start_server(teacher)
    out = tmp_path / "run"
    args = without_live_teacher(train_args(student, "x", chat_data, out, "--teacher_server_url", url,
                                           "--teacher_top_k", "4", "--lmbda", "0", "--max_steps", "100000",
                                           "--teacher_server_retries", "1"))
    line = train_until_a_server_is_lost(args, out, lambda: (process.kill(), process.communicate()))
    step = int(re.search(r"checkpoint-(\d+)", line).group(1))
    assert step >= 2
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


# ---------------------------------------------------------------------------------- cache storage and failed builds


def cache_command(tiny_models, data, folder, *extra) -> list:
    return ["-m", "gkd.tools.cache_teacher", "--teacher_model_name_or_path", tiny_models[1], "--tokenizer_name_or_path",
            tiny_models[0], "--dataset_name", data, "--top_k", TOP_K, "--output_dir", folder, "--max_length", "96",
            "--max_new_tokens", "8", "--shard_size", "3", *extra]


def test_a_bfloat16_cache_gives_the_teachers_targets_to_bfloat16_rounding(tiny_models, chat_data, cache, tmp_path):
    """`--storage_dtype bfloat16` (was: pyarrow has no bfloat16 type) is stored as its bits and read back as the
    teacher's float32 top-K rounded to bfloat16; a run trains from it."""
    import torch

    from gkd import models
    from gkd.batching import pad_batch
    from gkd.data import DataSource, EncodeOptions, prepare_dataset
    from gkd.teachers.cache import TeacherCache, score_batch

    student, teacher = tiny_models
    folder = tmp_path / "bf16"
    assert_ok(run_cli(cache_command(tiny_models, chat_data, folder, "--storage_dtype", "bfloat16")))
    manifest = json.loads((folder / "cache.json").read_text())
    assert manifest["storage_dtype"] == "bfloat16" and not (folder / "cache.partial.json").exists()
    tokenizer = models.load_tokenizer(models.ModelRef(str(student)))
    options = EncodeOptions(96, 8, tuple(manifest["identity"]["stop_token_ids"]))
    encoded = prepare_dataset(DataSource(str(chat_data)), tokenizer, options)[0]
    samples = encoded[0:len(encoded)]
    batch = pad_batch([dict(zip(samples, values)) for values in zip(*samples.values())], tokenizer.pad_token_id)
    model = models.load_frozen(models.ModelRef(str(teacher)), "float32")
    reference = score_batch(model, batch, TOP_K)  # float32 values, before any storage rounding
    exact = torch.tensor([value for row in reference for value in row["topk_log_probs"]]).reshape(-1, TOP_K)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    bf16, fp16 = (TeacherCache(path, vocab_size).targets(batch) for path in (folder, cache))
    assert torch.equal(bf16.ids, fp16.ids) and torch.equal(bf16.valid, fp16.valid) and bf16.valid.all()
    assert bf16.log_probs.dtype == torch.float32 and torch.equal(bf16.log_probs, exact.bfloat16().float())
    assert torch.allclose(bf16.log_probs, exact, rtol=2 ** -8, atol=0)  # bfloat16 keeps 8 significant bits
    assert not torch.equal(bf16.log_probs, fp16.log_probs)  # really stored in another precision
    assert torch.equal(bf16.actual_log_probs, fp16.actual_log_probs)  # float32 in both
    out = tmp_path / "trained"
    assert_ok(run_cli(without_live_teacher(train_args(student, teacher, chat_data, out, "--lmbda", "0",
                                                      "--teacher_logits_path", folder))))
    assert all(m["kd_loss"] > 0 for m in metrics(out)) and len(metrics(out)) == 2


def test_a_failed_cache_build_leaves_nothing_that_blocks_a_rerun(tiny_models, chat_data, tmp_path):
    """A build that raises after taking its folder (here the teacher's weights do not fit its config) releases the
    lock and, with no shard complete, leaves no partial cache: a rerun in the same process, with other options, builds
    (was: refused as busy, then as a partial cache built with other options)."""
    from gkd.tools import cache_teacher

    bad_teacher = tmp_path / "bad_teacher"
    shutil.copytree(tiny_models[1], bad_teacher)
    config = json.loads((bad_teacher / "config.json").read_text())
    config["intermediate_size"] *= 2
    (bad_teacher / "config.json").write_text(json.dumps(config))
    folder = tmp_path / "cache"
    command = [str(arg) for arg in cache_command(tiny_models, chat_data, folder)[2:]]  # without "-m module"
    teacher_flag = command.index("--teacher_model_name_or_path") + 1
    with pytest.raises(Exception):  # noqa: B017 -- whatever transformers raises for it
        cache_teacher.main([*command[:teacher_flag], str(bad_teacher), *command[teacher_flag + 1:],
                            "--storage_dtype", "bfloat16"])
    assert not folder.exists()
    folder.mkdir()  # a folder that was there before the build stays, emptied of what the build wrote
    with pytest.raises(Exception):  # noqa: B017
        cache_teacher.main([*command[:teacher_flag], str(bad_teacher), *command[teacher_flag + 1:]])
    assert [path.name for path in folder.iterdir() if path.name != ".gkd-run.lock"] == []
    cache_teacher.main(command + ["--storage_dtype", "bfloat16"])
    assert json.loads((folder / "cache.json").read_text())["storage_dtype"] == "bfloat16"


# ---------------------------------------------------------------- several teachers (--teacher NAME=SOURCE)


def named_teachers(args: list[str], *teachers: str) -> list[str]:
    """A training command whose one teacher is replaced by `--teacher NAME=SOURCE` options."""
    return without_live_teacher(args) + [item for teacher in teachers for item in ("--teacher", teacher)]


@pytest.fixture(scope="module")
def routed_data(chat_data, tmp_path_factory):
    """The chat data, records alternately taught by `math` and `chat`, the last two by the default."""
    path = tmp_path_factory.mktemp("routed") / "routed.jsonl"
    records = [json.loads(line) for line in chat_data.read_text().splitlines()]
    for number, record in enumerate(records[:-2]):
        record["teacher"] = ("math", "chat")[number % 2]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_several_teachers_each_teach_their_own_records_and_a_resume_keeps_them(
        capfd, tiny_models, second_teacher, routed_data, tmp_path):
    from helpers import refused

    student, teacher = tiny_models
    out = tmp_path / "out"
    # --seq_kd: step 1's completions are sampled by each row's own teacher (a static decoder per teacher model: the
    # two have other shapes), step 2's by the student
    args = named_teachers(train_args(student, teacher, routed_data, out, "--lmbda", "0.5", "--seed", "0", "--seq_kd",
                                     "--save_strategy", "steps", "--save_steps", "1", "--default_teacher", "chat"),
                          f"math={teacher}", f"chat={second_teacher}")
    result = run_cli(args)
    assert_ok(result)
    assert "samples per teacher: math 3, chat 5" in result.stderr
    logged = metrics(out)
    assert len(logged) == 2 and [(m["teacher_generated"], m["on_policy"]) for m in logged] == [(1.0, 0.0), (0.0, 1.0)]
    for name in ("math", "chat"):
        assert any(m.get(f"kd_loss/{name}", 0) > 0 for m in logged), name
        assert sum(m[f"kd_tokens/{name}"] for m in logged) > 0
    for m in logged:  # the teachers' per-token losses add up to the run's, weighted by their tokens
        tokens = sum(m[f"kd_tokens/{name}"] for name in ("math", "chat"))
        summed = sum(m.get(f"kd_loss/{name}", 0) * m[f"kd_tokens/{name}"] for name in ("math", "chat"))
        assert summed / tokens == pytest.approx(m["kd_loss"], rel=1e-4)
    resume = ["--resume_from_checkpoint", "last", "--max_steps", "3"]
    swapped = named_teachers(train_args(student, teacher, routed_data, out, "--default_teacher", "chat", *resume),
                             f"math={second_teacher}", f"chat={second_teacher}")[1:]
    refused(capfd, train.main, swapped, "was trained with --teacher math source", str(teacher))
    rerouted = args[1:args.index("--max_steps")] + args[args.index("--max_steps") + 2:] + resume
    rerouted[rerouted.index("--default_teacher") + 1] = "math"
    refused(capfd, train.main, rerouted, "was trained with --default_teacher chat; this run gives math")
    refused(capfd, train.main, without_live_teacher(train_args(student, teacher, routed_data, out, *resume))[1:]
            + ["--teacher", f"math={teacher}"], "this run is without --teacher chat")
    assert_ok(run_cli(args[:args.index("--max_steps")] + args[args.index("--max_steps") + 2:] + resume))
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3] and all("kd_tokens/chat" in m for m in logged)


@pytest.mark.parametrize("kind", ["live", "cache", "server"])
def test_one_named_teacher_trains_exactly_like_the_single_teacher_options(tiny_models, chat_data, cache, server,
                                                                          tmp_path, kind):
    student, teacher = tiny_models
    lmbda = "0" if kind == "cache" else "0.5"
    common = ["--lmbda", lmbda, "--seed", "0", "--teacher_top_k", str(TOP_K)]  # seed 0: steps 1 and 2 differ
    source, option = {"live": (teacher, "--teacher_model_name_or_path"), "cache": (cache, "--teacher_logits_path"),
                      "server": (server, "--teacher_server_url")}[kind]
    single = without_live_teacher(train_args(student, teacher, chat_data, tmp_path / "single", *common))
    assert_ok(run_cli(single + [option, source]))
    assert_ok(run_cli(named_teachers(train_args(student, teacher, chat_data, tmp_path / "named", *common),
                                     f"a={source}")))
    single, named = metrics(tmp_path / "single"), metrics(tmp_path / "named")
    if kind != "cache":
        assert {m["on_policy"] for m in single} == {0.0, 1.0}
    assert [m["loss"] for m in named] == [m["loss"] for m in single]
    assert [m["grad_norm"] for m in named] == [m["grad_norm"] for m in single]
    assert all(m["kd_tokens/a"] > 0 for m in named)
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("single", "named")]
    assert weights[0] == weights[1]


def test_each_teacher_is_checked_at_start_and_named(capfd, tiny_models, chat_data, cache, tmp_path):
    from helpers import refused

    student, teacher = tiny_models

    def teachers(*specs, extra=()):
        return named_teachers(train_args(student, teacher, chat_data, tmp_path / "out", "--lmbda", "0",
                                         "--default_teacher", "a", *extra), *specs)[1:]

    refused(capfd, train.main, teachers(f"a={teacher}", f"code={cache}", extra=["--teacher_top_k", "9"]),
            "--teacher code: --teacher_top_k 9", "holds only the top 8")
    refused(capfd, train.main, teachers(f"a={teacher}", f"other={tmp_path / 'missing'}"), "--teacher other: ")
    refused(capfd, train.main, teachers(f"a={teacher}", "b=http://127.0.0.1:9",
                                        extra=["--teacher_top_k", "4", "--teacher_server_retries", "0"]),
            "--teacher b: ", "Connection refused")
