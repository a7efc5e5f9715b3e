"""A teacher served by an inference engine on its own machines, through vLLM's OpenAI-compatible API.

Scoring: `POST /v1/completions` with the token ids of prompt + completion as the prompt, `max_tokens: 1` and
`prompt_logprobs: K`. vLLM answers, per prompt token after the first, a map from token id (a JSON string) to
`{"logprob", "rank", "decoded_token"}`: the K most likely tokens (ranks 1..K) plus the actual token, so K or K+1
entries; the entry at position P + c is the teacher's distribution for completion token c. `--teacher_top_k 1` with
`--beta 1` uses the actual token's entry (tinker's sampled-token estimator).
Sampling (`--seq_kd`): the same endpoint with `max_tokens`, `temperature`, `top_p`, `seed`, `stop_token_ids` and
`return_token_ids` (vLLM >= 0.10.2; older servers give ids through `return_tokens_as_token_ids`).
Requests carry several sequences each and run concurrently; failures that may pass (connection refused, timeouts,
HTTP 408/429/5xx) are retried with exponential backoff, then the run stops between optimizer steps. An answer that
breaks the contract (not JSON, fewer than K log-probabilities, values that are not log-probabilities, ids outside
the vocabulary: `check_answer`) is an error at once: asking again would get the same answer. gkd does not import
vLLM: the wire is HTTP, through `gkd.web` (a deadline on each whole request, the standard library's client).
"""

import http.client
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import web
from ..batching import mask_after_stop
from ..errors import ModelError
from ..sampling import Sampling
from .base import PrefetchedTeacher, SampleRequest, TeacherUnavailable
from .targets import SparseTargets, completion_rows

logger = logging.getLogger(__name__)

ROWS_PER_REQUEST = 8
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)
LOG_PROB_ROUNDING = 1e-3  # a log-probability this far above 0 is float rounding (vLLM's log-softmax is float32)


class TeacherServerError(TeacherUnavailable):
    """The teacher server refused a request, answered outside the contract, or could not be reached after every
    retry: at start-up one line, during training a checkpoint and a stop."""


class TeacherServer:
    """The client of one served teacher: its model id, and the two requests gkd makes of it."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 5, concurrency: int = 8):
        self.url = url.rstrip("/").removesuffix("/v1")  # the base URL, whether or not it was given with /v1
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency
        self.model, self.root, self.max_model_len = None, None, None
        self.vocab_size = None  # the served model's vocabulary (`check_tokenizer`): answers' ids must lie below it

    # ---- start-up checks

    def describe(self) -> dict:
        """GET /v1/models: the served model's id (what requests name), its path or Hub id (`root`) and context."""
        where = f"{self.url}/v1/models"
        listing = self._request("GET", "/v1/models")
        cards = listing.get("data")
        if not isinstance(cards, list) or not cards or not isinstance(cards[0], dict) or not isinstance(
                cards[0].get("id"), str):
            raise TeacherServerError(f"{where} lists no model; is this an OpenAI-compatible server?")
        card = cards[0]
        self.model, self.root = card["id"], card.get("root") or card["id"]
        self.max_model_len = card.get("max_model_len")
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 1):
            raise TeacherServerError(f"{where}: max_model_len {self.max_model_len!r} is not a positive integer")
        return card

    def check(self, top_k: int, max_length: int) -> None:
        """Refuse a server that cannot do what the run needs: sequences as long as `max_length` plus the one token
        vLLM generates when it scores a prompt, K log-probabilities per position (vLLM's `--max-logprobs`, 20 by
        default, caps K)."""
        if self.max_model_len is not None and self.max_model_len < max_length + 1:
            raise TeacherServerError(
                f"{self.url} serves {self.model} with max_model_len {self.max_model_len}; --max_length {max_length} "
                f"needs max_model_len >= max_length + 1 (vLLM generates one token when it scores a prompt): restart "
                f"it with --max-model-len {max_length + 1} or more, or lower --max_length")
        try:
            self.score([([0, 0], [0])], top_k)  # a 3-token probe: a server whose max-logprobs is below K refuses it
        except TeacherServerError as error:
            if "HTTP 400" not in str(error):
                raise
            raise TeacherServerError(f"{self.url} cannot give {top_k} log-probabilities per token ({error}); start "
                                     f"vLLM with --max-logprobs {top_k} or above, or lower --teacher_top_k") from None

    # ---- scoring and sampling

    def score(self, rows: list[tuple[list[int], list[int]]], top_k: int) -> list[dict]:
        """For each (prompt ids, completion ids): the teacher's top-K ids and log-probabilities at every completion
        position, and the log-probability of the completion's own token there."""
        requests = [rows[start:start + ROWS_PER_REQUEST] for start in range(0, len(rows), ROWS_PER_REQUEST)]

        def one(chunk):
            body = {"model": self.model, "prompt": [prompt + completion for prompt, completion in chunk],
                    "max_tokens": 1, "prompt_logprobs": top_k, "temperature": 1.0}
            answer = self._request("POST", "/v1/completions", body)
            return check_answer(answer, chunk, top_k, self.vocab_size, f"{self.url}/v1/completions")

        return [scores for chunk in self._map(one, requests) for scores in chunk]

    def sample(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[int]]:
        """One completion per prompt, sampled by the served teacher as `sampling` says (temperature None: greedy,
        vLLM's temperature 0), row i from `seeds[i]`; each ends with its stop token when it stopped."""
        max_new_tokens, stop_token_ids = sampling.max_new_tokens, list(sampling.stop_token_ids)

        def one(index):
            body = {"model": self.model, "prompt": prompts[index], "max_tokens": max_new_tokens,
                    "temperature": sampling.temperature or 0.0, "top_p": sampling.top_p,
                    "seed": seeds[index] % 2**31, "stop_token_ids": stop_token_ids, "skip_special_tokens": False,
                    "return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}
            answer = self._request("POST", "/v1/completions", body)
            return check_sampled(answer, max_new_tokens, stop_token_ids, self.vocab_size,
                                 f"{self.url}/v1/completions")

        return list(self._map(one, range(len(prompts))))

    def targets(self, batch: dict, top_k: int, vocab_size: int) -> SparseTargets:
        """`SparseTargets` for the completion positions of one padded micro-batch."""
        return sparse_targets(self.score(completion_rows(batch), top_k), top_k, vocab_size)

    # ---- HTTP

    def _map(self, function, items):
        items = list(items)
        if len(items) <= 1 or self.concurrency == 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(function, items))

    def _request(self, method: str, path: str, body: dict | None = None, expect_json: bool = True,
                 retried_status: tuple[int, ...] = RETRIED_STATUS) -> dict:
        """One JSON request, each try bounded end to end by the timeout; what may pass is retried with backoff.
        `expect_json` False: any 2xx body is accepted (vLLM answers adapter loads in plain text) and {} returned."""
        where = self.url + path
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            try:
                answer = web.request(where, method, data, {"Content-Type": "application/json"}, self.timeout)
            except (OSError, http.client.HTTPException) as error:  # HTTPException: a server that died mid-answer
                problem = str(getattr(error, "reason", None) or error) or type(error).__name__
            else:
                if answer.status in retried_status:
                    problem = f"HTTP {answer.status}: {_error_message(answer.body)}"
                elif not 200 <= answer.status < 300:
                    raise TeacherServerError(f"{where} answered HTTP {answer.status}: {_error_message(answer.body)}")
                elif not expect_json:
                    return {}
                else:
                    try:
                        return _json_object(answer, where)
                    except _CutShort as error:
                        problem = str(error)
            if attempt < self.retries:
                delay = min(0.5 * 2**attempt, 30.0)
                logger.warning("teacher server %s: %s; retrying in %.1f s (%d of %d)", where, problem, delay,
                               attempt + 1, self.retries)
                time.sleep(delay)
        raise TeacherServerError(f"teacher server {where} failed {self.retries + 1} times (last: {problem})")


class _CutShort(Exception):
    """A JSON answer that ends early (a server that died while it wrote, without a length): worth asking again."""


def _json_object(answer: web.Answer, where: str) -> dict:
    try:
        value = json.loads(answer.body)
    except ValueError:
        if answer.body.lstrip()[:1] in (b"{", b"["):
            raise _CutShort(f"an answer cut short ({len(answer.body)} bytes of JSON)") from None
        raise TeacherServerError(
            f"{where} answered something that is not JSON ({answer.content_type or 'no Content-Type'}, starting "
            f"{_first_bytes(answer.body)}): not an OpenAI-compatible server; is --teacher_server_url vLLM's "
            "address?") from None
    if not isinstance(value, dict):
        raise TeacherServerError(f"{where} answered JSON that is not an object (starting {_first_bytes(answer.body)})")
    return value


def _first_bytes(body: bytes, count: int = 80) -> str:
    """The start of an answer, escaped onto one line."""
    text = body[:count].decode("utf-8", errors="replace")
    return repr(text) + ("..." if len(body) > count else "")


def _error_message(body: bytes) -> str:
    """vLLM's error body: `{"error": {"message": ...}}` since 0.10.1, `{"object": "error", "message": ...}` before;
    anything else (a proxy's HTML page) by its first bytes."""
    try:
        value = json.loads(body)
    except ValueError:
        return _first_bytes(body) if body else "(no body)"
    if not isinstance(value, dict):
        return _first_bytes(body)
    if isinstance(value.get("error"), dict):
        return str(value["error"].get("message", ""))
    return str(value.get("message") or value.get("detail") or value)


# ---- the contract: what a vLLM answer must hold before gkd trains on it

def check_answer(answer: dict, rows: list[tuple[list[int], list[int]]], top_k: int, vocab_size: int | None,
                 where: str) -> list[dict]:
    """The scores in a scoring answer (one choice per (prompt, completion) row), checked against vLLM's contract:
    `prompt_logprobs` has one entry per token of the row; at each completion position the entry holds the K tokens
    ranked 1..K and the row's own token, each a finite log-probability <= 0 (vLLM sends -inf as -9999.0) and an id
    inside the served model's vocabulary (`vocab_size`, not checked when None). Per row: the top-K ids and
    log-probabilities at each completion position, best first, and the own token's log-probability there. Prompt
    positions are not read, so not checked. Anything else is a `TeacherServerError` naming the server, the row, the
    position and what is wrong."""
    choices = _choices(answer, len(rows), where)
    scores = []
    for row, (choice, (prompt, completion)) in enumerate(zip(choices, rows)):
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(prompt) + len(completion):
            got = f"{len(entries)} entries" if isinstance(entries, list) else repr(entries)[:40]
            raise TeacherServerError(
                f"{where}: prompt_logprobs of row {row} should have one entry per token ({len(prompt)} + "
                f"{len(completion)}), got {got} (a vLLM server answers them to `prompt_logprobs`; is this one?)")
        ids, log_probs, actual = [], [], []
        for offset, token in enumerate(completion):
            position = len(prompt) + offset
            try:
                top, own = _position_scores(entries[position], token, top_k, vocab_size)
            except ValueError as error:
                raise TeacherServerError(f"{where}: prompt_logprobs of row {row}, token {position}: {error} "
                                         "(an answer that breaks vLLM's contract)") from None
            ids.append([token_id for token_id, _ in top])
            log_probs.append([log_prob for _, log_prob in top])
            actual.append(own)
        scores.append({"ids": ids, "log_probs": log_probs, "actual": actual})
    return scores


def _position_scores(entry, token: int, top_k: int, vocab_size: int | None) -> tuple[list[tuple[int, float]], float]:
    """One position's `{token id: {"logprob", "rank", ...}}`: its top K (id, log-probability) by rank, and the own
    token's log-probability. Raises `ValueError` saying what breaks the contract."""
    if not isinstance(entry, dict):
        raise ValueError(f"no log-probabilities (got {repr(entry)[:40]})")
    ranked = []
    for key, value in entry.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ValueError(f"token id {key!r} is not an integer") from None
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise ValueError(f"token id {token_id} is outside the served model's vocabulary of {vocab_size}")
        log_prob = value.get("logprob") if isinstance(value, dict) else None
        if not isinstance(log_prob, (int, float)) or isinstance(log_prob, bool):
            raise ValueError(f"token {token_id} has no numeric logprob (got {repr(value)[:60]})")
        if not math.isfinite(log_prob) or log_prob > LOG_PROB_ROUNDING:
            raise ValueError(f"token {token_id} has logprob {log_prob}, not a log-probability (finite, <= 0)")
        rank = value.get("rank")
        if rank is not None and (not _is_int(rank) or rank < 1):
            raise ValueError(f"token {token_id} has rank {rank!r}, not a positive integer")
        ranked.append((rank or top_k + 1, token_id, float(log_prob)))
    ranked.sort(key=lambda item: (item[0], -item[2]))
    top = [(token_id, log_prob) for rank, token_id, log_prob in ranked if rank <= top_k][:top_k]
    if len(top) < top_k:
        raise ValueError(f"{len(top)} log-probabilities ranked 1..{top_k}, asked for {top_k}")
    own = entry.get(str(token))
    if own is None:
        raise ValueError(f"no log-probability for the token itself ({token})")
    return top, float(own["logprob"])


def check_sampled(answer: dict, max_tokens: int, stop_token_ids: list[int], vocab_size: int | None,
                  where: str) -> list[int]:
    """The token ids of a one-completion sampling answer, checked: integers inside the vocabulary, at most
    `max_tokens`; a completion that stopped ends with its stop token (vLLM does not always return it)."""
    (choice,) = _choices(answer, 1, where)
    ids = choice.get("token_ids")
    if ids is None:  # servers before vLLM 0.10.2: "token_id:123" strings through return_tokens_as_token_ids
        tokens = (choice.get("logprobs") or {}).get("tokens") or []
        if not all(isinstance(token, str) and token.startswith("token_id:") for token in tokens):
            raise TeacherServerError(f"{where} returned no token ids for a sampled completion")
        try:
            ids = [int(token.split(":", 1)[1]) for token in tokens]
        except ValueError:
            raise TeacherServerError(f"{where} returned a token that is not an id: {tokens[:3]}") from None
    if not isinstance(ids, list) or not all(_is_int(token) for token in ids):
        raise TeacherServerError(f"{where}: token_ids of a sampled completion are not integers: {repr(ids)[:60]}")
    outside = [token for token in ids if token < 0 or (vocab_size is not None and token >= vocab_size)]
    if outside:
        raise TeacherServerError(f"{where} sampled token {outside[0]}, outside the served model's vocabulary of "
                                 f"{vocab_size}")
    if len(ids) > max_tokens:
        raise TeacherServerError(f"{where} sampled {len(ids)} tokens, asked for at most {max_tokens}")
    if choice.get("finish_reason") == "stop" and (not ids or ids[-1] not in stop_token_ids):
        reason = choice.get("stop_reason")
        ids.append(reason if _is_int(reason) else stop_token_ids[0])  # EOS is not always returned
    return ids


def _choices(answer: dict, expected: int, where: str) -> list[dict]:
    """An answer's choices in prompt order: exactly one per prompt asked, indexed 0..n-1."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise TeacherServerError(f"{where}: the answer has no list of choices (got {repr(choices)[:40]})")
    indexes = [choice.get("index", position) for position, choice in enumerate(choices)]
    if len(choices) != expected or not all(map(_is_int, indexes)) or sorted(indexes) != list(range(expected)):
        raise TeacherServerError(f"{where}: asked for {expected} completions, got {len(choices)} (indexes "
                                 f"{indexes[:8]})")
    return [choice for _, choice in sorted(zip(indexes, choices), key=lambda pair: pair[0])]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sparse_targets(rows: list[dict], top_k: int, vocab_size: int) -> SparseTargets:
    """Stack per-row scores into `SparseTargets`: short rows padded with invalid slots; ids outside the vocabulary the
    student and the teacher share (a padded embedding's rows) are invalid, their mass falls to the tail."""
    positions = sum(len(row["ids"]) for row in rows)
    ids = torch.zeros(positions, top_k, dtype=torch.long)
    log_probs = torch.full((positions, top_k), float("-inf"))
    actual = torch.full((positions,), float("-inf"))
    index = 0
    for row in rows:
        for row_ids, row_log_probs, own in zip(row["ids"], row["log_probs"], row["actual"]):
            ids[index, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            log_probs[index, : len(row_log_probs)] = torch.tensor(row_log_probs)
            actual[index] = own
            index += 1
    valid = torch.isfinite(log_probs) & (ids < vocab_size)
    return SparseTargets(ids.masked_fill(~valid, 0), log_probs, valid, actual)


def served_model_ref(server: TeacherServer, trust_remote_code: bool):
    """The model a server says it serves (`root` of /v1/models), as this machine names it: a Hub id or an absolute
    path. A relative path that exists here is refused: which folder it means depends on where the server started."""
    from ..models import ModelRef

    root = Path(server.root).expanduser()
    if not root.is_absolute() and root.exists():
        raise ModelError(f"{server.url} serves {server.root!r}, a relative path, which need not be {root.resolve()} "
                         "here: name the teacher's tokenizer with --teacher_tokenizer_name_or_path, or serve the model "
                         "under an absolute path or a Hub id")
    return ModelRef(server.root, trust_remote_code=trust_remote_code, flag=f"the served model ({server.url})")


def check_tokenizer(server: TeacherServer, student_tokenizer, tokenizer_name: str | None, trust_remote_code: bool):
    """The served model must number tokens as the student does: load the tokenizer it names (or the one given) and
    compare the vocabularies, as for a live teacher."""
    from ..models import ModelRef, check_same_vocabulary, load_tokenizer

    name = tokenizer_name or server.root
    ref = ModelRef(name, trust_remote_code=trust_remote_code, flag="--teacher_tokenizer_name_or_path") \
        if tokenizer_name else served_model_ref(server, trust_remote_code)
    try:
        teacher_tokenizer = load_tokenizer(ref)
    except ModelError as error:
        raise ModelError(f"{error}; pass --teacher_tokenizer_name_or_path to name the served model's "
                         "tokenizer") from None
    check_same_vocabulary(student_tokenizer, teacher_tokenizer, f"{server.url} ({name})")
    served = _served_tokenizer(server, tokenizer_name, trust_remote_code)
    if served is not None:  # the tokenizer named for the server must be the one it serves, where that can be read
        served_vocab = served.get_vocab()
        differing = sum(served_vocab.get(token) != index for token, index in teacher_tokenizer.get_vocab().items())
        if differing:
            raise ModelError(f"--teacher_tokenizer_name_or_path {tokenizer_name}: not the tokenizer of the model "
                             f"{server.url} serves ({server.root}): {differing} tokens missing or numbered differently")
    server.vocab_size = max(len(teacher_tokenizer), _embedding_rows(name, trust_remote_code) or 0)


def _served_tokenizer(server: TeacherServer, tokenizer_name: str | None, trust_remote_code: bool):
    """The served model's own tokenizer where its `root` names one this machine holds (a folder, or a Hub id in the
    cache: nothing is downloaded for the check), beside a tokenizer named with --teacher_tokenizer_name_or_path;
    None otherwise (a served name that is neither)."""
    from huggingface_hub import try_to_load_from_cache

    from ..models import load_tokenizer

    if not tokenizer_name or not server.root or server.root == tokenizer_name:
        return None
    try:
        ref = served_model_ref(server, trust_remote_code)
    except ModelError:  # a relative path: not necessarily the folder of that name here
        return None
    try:
        held = Path(ref.name).is_dir() or isinstance(try_to_load_from_cache(ref.name, "tokenizer_config.json"), str)
    except ValueError:  # not a valid Hub id either
        held = False
    if not held:
        return None
    try:
        return load_tokenizer(ref)
    except (ModelError, OSError, ValueError):
        return None


def _embedding_rows(name: str, trust_remote_code: bool) -> int | None:
    """The served model's embedding rows, where its config can be read here (a padded embedding has more rows than
    its tokenizer has tokens, and a server may rank those ids); None for a tokenizer without a model config."""
    from ..models import ModelRef, embedding_size

    try:
        return embedding_size(ModelRef(name, trust_remote_code=trust_remote_code))
    except (OSError, ValueError):
        return None


class ServedTeacher(PrefetchedTeacher):
    """The `Teacher` a run asks over HTTP: K is `--teacher_top_k`; it samples completions too (`--seq_kd`)."""

    can_sample = True

    def __init__(self, server: TeacherServer, top_k: int | None, beta: float):
        self.server, self.top_k, self.beta = server, top_k, beta

    def lookup(self, batch: dict, vocab_size: int) -> SparseTargets:
        return self.server.targets(batch, self.top_k, vocab_size)

    def sample(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [row[mask.bool()].tolist() for row, mask in zip(request.prompt_ids, request.prompt_mask)]
        with self.timed("teacher_sampling_seconds"):
            completions = self.server.sample(prompts, request.sampling, request.seeds)
        return completion_tensors(completions, request)


def completion_tensors(completions: list[list[int]], request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled id lists as the trainer's padded completions and mask. A served teacher samples from its whole (maybe
    padded) vocabulary: a completion ends before an id the student cannot embed (a model beside the student never
    samples one: `Sampling.suppress_ids`)."""
    sampling = request.sampling
    completions = [ids[: next((i for i, token in enumerate(ids) if token >= request.vocab_size), len(ids))]
                   for ids in completions]
    width = max(1, max(len(ids) for ids in completions))
    completion_ids = torch.full((len(completions), width), sampling.pad_token_id, dtype=torch.long)
    for row, ids in enumerate(completions):
        completion_ids[row, :len(ids)] = torch.tensor(ids[:width], dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in completions])
    valid = torch.arange(width)[None, :] < lengths[:, None]
    completion_mask = mask_after_stop(completion_ids, valid, list(sampling.stop_token_ids))
    return completion_ids.masked_fill(completion_mask == 0, sampling.pad_token_id), completion_mask
