"""Each teacher source through the one interface the trainer asks (`gkd.teachers.Teacher`), in process: the K each
decides when it opens, what each hands the loss, and one tiny teacher giving the same targets as a live model, as a
cache built from it, and as the shipped server serving it. The command lines around them: test_teacher_cli.py."""

import threading
from http.server import ThreadingHTTPServer

import pytest
import torch

from gkd import losses, models
from gkd.batching import pad_batch
from gkd.data import DataSource, EncodeOptions, prepare_dataset
from gkd.errors import ConfigError
from gkd.sampling import Sampling
from gkd.teachers import CompletionPositions, SampleRequest, TeacherUnavailable
from gkd.teachers.cache import CachedTeacher, TeacherCache
from gkd.teachers.live import LiveTeacher
from gkd.teachers.server import ServedTeacher, TeacherServer
from gkd.tools import cache_teacher
from gkd.tools.teacher_server import ServeConfig, make_handler
from gkd.tools.teacher_server import Teacher as ServedModel

TOP_K = 6
MAX_LENGTH, MAX_NEW_TOKENS = 96, 8


@pytest.fixture(scope="module")
def loaded(tiny_models):
    student, teacher = tiny_models
    tokenizer = models.load_tokenizer(models.ModelRef(str(student)))
    model = models.load_frozen(models.ModelRef(str(teacher)), "float32")
    return tokenizer, model


@pytest.fixture(scope="module")
def window(loaded, chat_data):
    """The encoded chat data as one padded micro-batch, and its completion positions."""
    tokenizer, _ = loaded
    stop_ids = (tokenizer.eos_token_id,)
    encoded = prepare_dataset(DataSource(str(chat_data)), tokenizer, EncodeOptions(MAX_LENGTH, MAX_NEW_TOKENS,
                                                                                   stop_ids))[0]
    rows = encoded[0:len(encoded)]
    return pad_batch([dict(zip(rows, values)) for values in zip(*rows.values())], tokenizer.pad_token_id)


def positions_of(batch: dict) -> CompletionPositions:
    prompt_width, completion_width = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    mask = batch["completion_mask"].bool()
    return CompletionPositions(batch, torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                               torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
                               slice(prompt_width - 1, prompt_width - 1 + completion_width), mask,
                               batch["completion_ids"][mask])


@pytest.fixture(scope="module")
def cache_folder(tiny_models, chat_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interface_cache") / "cache"
    cache_teacher.main(["--teacher_model_name_or_path", str(tiny_models[1]), "--tokenizer_name_or_path",
                        str(tiny_models[0]), "--dataset_name", str(chat_data), "--top_k", str(TOP_K), "--output_dir",
                        str(folder), "--max_length", str(MAX_LENGTH), "--max_new_tokens", str(MAX_NEW_TOKENS)])
    return folder


@pytest.fixture(scope="module")
def server_url(tiny_models):
    """The shipped server (gkd-teacher-serve's code) on a thread of this process, on a free loopback port."""
    served = ServedModel(ServeConfig(model_name_or_path=str(tiny_models[1]), port=0))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def served_teacher(url: str, top_k: int, beta: float = 0.5) -> ServedTeacher:
    server = TeacherServer(url, timeout=30, retries=0, concurrency=2)
    server.describe()
    return ServedTeacher(server, top_k, beta)


# ---------------------------------------------------------------- K, decided when a source opens


def test_k_is_decided_when_each_source_opens(loaded, cache_folder, server_url):
    _, model = loaded
    cache = TeacherCache(cache_folder, model.config.vocab_size)
    assert CachedTeacher(cache, None, 0.5).top_k == TOP_K  # the cache's own K by default
    assert CachedTeacher(cache, 3, 0.5).top_k == 3
    assert served_teacher(server_url, 4).top_k == 4
    assert LiveTeacher(model, None, 0.5, 1.0, 512).top_k is None  # the full vocabulary
    assert LiveTeacher(model, 5, 0.5, 1.0, 512).top_k == 5


def test_a_cache_refuses_more_k_than_it_holds(loaded, cache_folder):
    from gkd.teachers.cache import CacheIdentity, check_fits, read_manifest

    manifest = read_manifest(cache_folder)
    identity = CacheIdentity(**{key: tuple(value) if isinstance(value, list) else value
                                for key, value in manifest["identity"].items()})
    check_fits(manifest, identity, TOP_K, cache_folder)
    with pytest.raises(ConfigError, match=f"holds only the top {TOP_K}"):
        check_fits(manifest, identity, TOP_K + 1, cache_folder)


# ---------------------------------------------------------------- what each hands the loss


def test_a_live_teacher_hands_the_dense_loss_its_states_or_logits(loaded, window):
    _, model = loaded
    teacher, positions = LiveTeacher(model, None, 0.5, 1.0, 512), positions_of(window)
    with torch.no_grad():
        logits = model(input_ids=positions.input_ids, attention_mask=positions.attention_mask).logits
    expected = logits[:, positions.columns][positions.mask]
    dense = teacher.targets(positions, as_logits=False, vocab_size=model.config.vocab_size)
    assert isinstance(dense, losses.DenseTeacher)
    torch.testing.assert_close(torch.nn.functional.linear(dense.hidden, dense.weight, dense.bias), expected)
    torch.testing.assert_close(teacher.targets(positions, as_logits=True, vocab_size=model.config.vocab_size),
                               expected)


@pytest.mark.parametrize("as_logits", [False, True])
def test_a_live_teachers_top_k_is_the_top_of_its_distribution(loaded, window, as_logits):
    _, model = loaded
    positions = positions_of(window)
    with torch.no_grad():
        logits = model(input_ids=positions.input_ids, attention_mask=positions.attention_mask).logits
    log_probs = logits[:, positions.columns][positions.mask].log_softmax(-1)
    sparse = LiveTeacher(model, TOP_K, 0.5, 1.0, 3).targets(positions, as_logits, model.config.vocab_size)
    assert isinstance(sparse, losses.SparseTeacher) and sparse.ids.shape == (len(positions.labels), TOP_K)
    torch.testing.assert_close(sparse.log_probs, log_probs.topk(TOP_K).values)
    assert torch.equal(sparse.ids, log_probs.topk(TOP_K).indices) and sparse.valid.all()


def test_k_1_with_beta_1_compares_on_the_sampled_token(loaded, window):
    """tinker's estimator: the support is each position's own token, with the teacher's log-probability of it."""
    _, model = loaded
    positions = positions_of(window)
    with torch.no_grad():
        logits = model(input_ids=positions.input_ids, attention_mask=positions.attention_mask).logits
    log_probs = logits[:, positions.columns][positions.mask].log_softmax(-1)
    sparse = LiveTeacher(model, 1, 1.0, 1.0, 512).targets(positions, False, model.config.vocab_size)
    assert torch.equal(sparse.ids[:, 0], positions.labels)
    torch.testing.assert_close(sparse.log_probs[:, 0], log_probs.gather(1, positions.labels[:, None])[:, 0])


# ---------------------------------------------------------------- one teacher, three sources, the same targets


def test_one_teacher_gives_the_same_targets_live_cached_and_served(loaded, window, cache_folder, server_url):
    _, model = loaded
    vocab_size = model.config.vocab_size
    positions = positions_of(window)
    live = LiveTeacher(model, TOP_K, 0.5, 1.0, 512).targets(positions, False, vocab_size)
    for teacher in (CachedTeacher(TeacherCache(cache_folder, vocab_size), TOP_K, 0.5),
                    served_teacher(server_url, TOP_K)):
        (batch,) = teacher.fetch([window], vocab_size)
        sparse = teacher.targets(positions_of(batch), False, vocab_size)
        assert torch.equal(sparse.ids, live.ids), type(teacher).__name__
        assert torch.equal(sparse.valid, live.valid)
        # the cache stores float16; the server computes in its own batch (padding changes the last bits)
        torch.testing.assert_close(sparse.log_probs, live.log_probs, rtol=2e-3, atol=2e-3)
        timings = teacher.pop_timings()
        assert timings["teacher_seconds"] > 0 and teacher.pop_timings() == {}


def test_a_served_teacher_samples_through_the_request(loaded, window, server_url):
    tokenizer, _ = loaded
    teacher = served_teacher(server_url, TOP_K)
    sampling = Sampling(5, (tokenizer.eos_token_id,), tokenizer.pad_token_id, temperature=1.0)
    request = SampleRequest(window["prompt_ids"][:3], window["prompt_mask"][:3], sampling, [1, 2, 3], 10_000,
                            decode=None)
    ids, mask = teacher.sample(request)
    again, _ = teacher.sample(request)
    assert ids.shape[0] == 3 and ids.shape[1] <= 5 and mask.sum() > 0
    assert torch.equal(ids, again)  # the same seeds, the same completions
    assert "teacher_sampling_seconds" in teacher.pop_timings()


def test_a_server_that_is_gone_is_unavailable_not_a_crash(loaded, window, server_url):
    tokenizer, model = loaded
    teacher = served_teacher(server_url, TOP_K)
    teacher.server.url = "http://127.0.0.1:9"  # nothing listens on the discard port
    with pytest.raises(TeacherUnavailable, match="127.0.0.1:9"):
        teacher.fetch([window], model.config.vocab_size)


# ---------------------------------------------------------------- vLLM's answers, read and checked


def vllm_answer(rows, entries_of) -> dict:
    """A /v1/completions answer in vLLM's shape: one choice per row, `prompt_logprobs` null at token 0."""
    choices = []
    for index, (prompt, completion) in enumerate(rows):
        tokens = prompt + completion
        entries = [None] + [entries_of(position, tokens[position]) for position in range(1, len(tokens))]
        choices.append({"index": index, "text": "", "prompt_logprobs": entries, "finish_reason": "length"})
    return {"id": "cmpl-1", "object": "text_completion", "choices": choices}


def ranked(position, token, k=3, logprob=-1.0):
    """The top k ids (10, 11, ...) and the own token, as vLLM lists them."""
    entry = {str(10 + rank): {"logprob": logprob - rank, "rank": rank + 1, "decoded_token": "x"} for rank in range(k)}
    entry.setdefault(str(token), {"logprob": -7.5, "rank": 99, "decoded_token": "y"})
    return entry


def test_a_vllm_answer_gives_top_k_and_the_own_token_at_completion_positions():
    from gkd.teachers.server import check_answer, sparse_targets

    rows = [([5, 6], [7, 8]), ([5], [9])]
    scores = check_answer(vllm_answer(rows, ranked), rows, 3, 1000, "server")
    assert scores[0]["ids"] == [[10, 11, 12]] * 2 and scores[1]["actual"] == [-7.5]
    assert scores[0]["log_probs"][0] == [-1.0, -2.0, -3.0]
    targets = sparse_targets(scores, 3, vocab_size=11)  # ids at or beyond the shared vocabulary are invalid slots
    assert targets.ids.shape == (3, 3) and targets.valid[:, 0].all() and not targets.valid[:, 1:].any()


@pytest.mark.parametrize("broken, expected", [
    (lambda position, token: ranked(position, token, k=2), "2 log-probabilities ranked 1..3, asked for 3"),
    (lambda position, token: ranked(position, token, logprob=float("nan")), "logprob nan, not a log-probability"),
    (lambda position, token: {**ranked(position, token), "123456": {"logprob": -9.0, "rank": 4}}, "123456 is outside the served model's vocabulary"),
    (lambda position, token: {str(10 + rank): {"logprob": -1.0 - rank, "rank": rank + 1} for rank in range(3)},
     "no log-probability for the token itself"),
])
def test_an_answer_that_breaks_the_contract_is_an_error_naming_the_server(broken, expected):
    from gkd.teachers.server import TeacherServerError, check_answer

    rows = [([5, 6], [7, 8])]
    with pytest.raises(TeacherServerError, match="http://teacher:8000") as raised:
        check_answer(vllm_answer(rows, broken), rows, 3, 1000, "http://teacher:8000/v1/completions")
    assert expected in str(raised.value)


# ---------------------------------------------------------------- several teachers, each row its own


def test_several_teachers_give_each_row_its_own_teachers_targets(loaded, window, second_teacher, cache_folder):
    """A live teacher (dense) and a cache of another (top-K) behind one RoutedTeacher: each is asked about its own
    rows only, and each part holds what that teacher alone gives at those rows' positions."""
    from gkd.teachers.routed import RoutedTeacher

    _, model = loaded
    vocab_size = model.config.vocab_size
    other = models.load_frozen(models.ModelRef(str(second_teacher)), "float32")
    live, cached = LiveTeacher(other, None, 0.5, 1.0, 512), CachedTeacher(TeacherCache(cache_folder, vocab_size),
                                                                          TOP_K, 0.5)
    routed = RoutedTeacher({"chat": live, "math": cached})
    rows = window["completion_mask"].shape[0]
    batch = {**window, "teacher_index": torch.tensor([row % 2 for row in range(rows)])}
    (fetched,) = routed.fetch([batch], vocab_size)
    positions = positions_of(fetched)
    parts = routed.targets(positions, as_logits=False, vocab_size=vocab_size)
    assert [part.name for part in parts] == ["chat", "math"]
    owner = batch["teacher_index"][:, None].expand_as(positions.mask)[positions.mask]
    whole = positions_of(window)
    dense = live.targets(whole, as_logits=False, vocab_size=vocab_size)
    (alone,) = cached.fetch([window], vocab_size)
    sparse = cached.targets(positions_of(alone), False, vocab_size)
    chat, math = parts
    assert torch.equal(chat.rows, owner == 0) and torch.equal(math.rows, owner == 1)
    assert isinstance(chat.target, losses.DenseTeacher) and isinstance(math.target, losses.SparseTeacher)
    torch.testing.assert_close(chat.target.hidden, dense.hidden[chat.rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(math.target.ids, sparse.ids[math.rows])
    assert torch.equal(math.target.log_probs, sparse.log_probs[math.rows])
    logits = routed.targets(positions, as_logits=True, vocab_size=vocab_size)[0].target
    torch.testing.assert_close(logits, live.targets(whole, True, vocab_size)[chat.rows], rtol=1e-5, atol=1e-5)
    # rows of one teacher only: it is asked about the whole batch, as the run's one teacher would be
    only_math = {**window, "teacher_index": torch.ones(rows, dtype=torch.long)}
    (fetched,) = routed.fetch([only_math], vocab_size)
    (part,) = routed.targets(positions_of(fetched), False, vocab_size)
    assert part.name == "math" and bool(part.rows.all()) and torch.equal(part.target.ids, sparse.ids)
    assert "teacher_seconds" in routed.pop_timings()


def test_several_prefetched_teachers_are_asked_at_once_and_sample_their_own_rows(loaded, window, cache_folder,
                                                                                 server_url):
    """A cache and a server behind one RoutedTeacher: fetched on two threads, each part its own source's top-K; and
    under --seq_kd each row's completion is its own teacher's (a server draws a row from its seed alone)."""
    from gkd.teachers.routed import RoutedTeacher

    tokenizer, model = loaded
    vocab_size = model.config.vocab_size
    cached = CachedTeacher(TeacherCache(cache_folder, vocab_size), TOP_K, 0.5)
    routed = RoutedTeacher({"served": served_teacher(server_url, TOP_K), "cached": cached})
    rows = window["completion_mask"].shape[0]
    batch = {**window, "teacher_index": torch.tensor([(row // 2) % 2 for row in range(rows)])}
    (fetched,) = routed.fetch([batch], vocab_size)
    parts = routed.targets(positions_of(fetched), False, vocab_size)
    live = LiveTeacher(model, TOP_K, 0.5, 1.0, 512).targets(positions_of(window), False, vocab_size)
    assert [part.name for part in parts] == ["served", "cached"]
    for part in parts:
        assert torch.equal(part.target.ids, live.ids[part.rows]), part.name
        torch.testing.assert_close(part.target.log_probs, live.log_probs[part.rows], rtol=2e-3, atol=2e-3)
    assert routed.pop_timings()["teacher_seconds"] > 0

    sampling = Sampling(5, (tokenizer.eos_token_id,), tokenizer.pad_token_id, temperature=1.0)
    two_servers = RoutedTeacher({"a": served_teacher(server_url, TOP_K), "b": served_teacher(server_url, TOP_K)})
    request = SampleRequest(window["prompt_ids"][:4], window["prompt_mask"][:4], sampling, [1, 2, 3, 4], 10_000,
                            decode=None, teacher_index=torch.tensor([1, 0, 0, 1]))
    ids, mask = two_servers.sample(request)
    alone, alone_mask = served_teacher(server_url, TOP_K).sample(request)
    for row in range(4):
        assert ids[row][mask[row].bool()].tolist() == alone[row][alone_mask[row].bool()].tolist()


def test_a_request_whose_client_left_while_it_waited_is_dropped_not_computed(tiny_models, caplog):
    """The shipped server holds one lock around its model; a client that timed out and closed its connection while
    its request waited (it will ask again) must not cost a forward: retries would pile up behind the lock."""
    import http.client
    import json
    import logging
    import socket
    import time

    from gkd.tools.teacher_server import connection_closed

    served = ServedModel(ServeConfig(model_name_or_path=str(tiny_models[1]), port=0))
    forwards = []
    served.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 2})
    try:
        with caplog.at_level(logging.INFO, logger="gkd.tools.teacher_server"):
            with served.lock:  # the model is busy: the request waits, and its client gives up
                gone = socket.create_connection((host, port))
                gone.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                             f"{body}".encode())
                gone.close()
            deadline = time.monotonic() + 30
            while "request dropped" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "request dropped" in caplog.text and not forwards
            staying = http.client.HTTPConnection(host, port, timeout=30)
            staying.request("POST", "/v1/completions", body)
            assert staying.getresponse().status == 200 and forwards
    finally:
        httpd.shutdown()
        httpd.server_close()
    left, right = socket.socketpair()
    assert not connection_closed(left)  # open and idle
    right.sendall(b"GET")
    assert not connection_closed(left)  # its next request (keep-alive)
    right.close()
    left.recv(3)
    assert connection_closed(left)
    left.close()


def test_a_served_model_named_by_a_relative_path_is_not_guessed(tmp_path, monkeypatch):
    """vLLM reports the model as it was given: "model" on the server's machine need not be ./model here."""
    from types import SimpleNamespace

    from gkd.errors import ModelError
    from gkd.teachers.server import served_model_ref

    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="'model', a relative path.*--teacher_tokenizer_name_or_path"):
        served_model_ref(SimpleNamespace(root="model", url="http://h:8000"), False)
    assert served_model_ref(SimpleNamespace(root=str(tmp_path / "model"), url="http://h:8000"), False).name == \
        str(tmp_path / "model")
    assert served_model_ref(SimpleNamespace(root="Org/served", url="http://h:8000"), False).name == "Org/served"
