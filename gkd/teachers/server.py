"""A teacher served by an inference engine on its own machines, through vLLM's OpenAI-compatible API.

Scoring: `POST /v1/completions` with the token ids of prompt + completion as the prompt, `max_tokens: 1` and
`prompt_logprobs: K`. vLLM answers, per prompt token after the first, a map from token id (a JSON string) to
`{"logprob", "rank", "decoded_token"}`: the K most likely tokens (ranks 1..K) plus the actual token, so K or K+1
entries; the entry at position P + c is the teacher's distribution for completion token c. `--teacher_top_k 1` with
`--beta 1` uses the actual token's entry (tinker's sampled-token estimator).
Sampling (`--seq_kd`): the same endpoint with `max_tokens`, `temperature`, `top_p`, `seed`, `stop_token_ids` and
`return_token_ids` (vLLM >= 0.10.2; older servers give ids through `return_tokens_as_token_ids`).
Requests carry several sequences each and run concurrently; failures that may pass (connection refused, timeouts,
HTTP 408/429/5xx) are retried with exponential backoff, then the run stops between optimizer steps. gkd does not
import vLLM: the wire is HTTP, with the standard library's client.
"""

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import GKDError, ModelError
from . import SparseTargets, completion_rows

logger = logging.getLogger(__name__)

ROWS_PER_REQUEST = 8
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)


class TeacherServerError(GKDError):
    """The teacher server refused a request, or could not be reached after every retry."""


class TeacherServer:
    """The client of one served teacher: its model id, and the two requests gkd makes of it."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 5, concurrency: int = 8):
        self.url = url.rstrip("/").removesuffix("/v1")  # the base URL, whether or not it was given with /v1
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency
        self.model, self.root, self.max_model_len = None, None, None

    # ---- start-up checks

    def describe(self) -> dict:
        """GET /v1/models: the served model's id (what requests name), its path or Hub id (`root`) and context."""
        listing = self._request("GET", "/v1/models")
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not cards:
            raise TeacherServerError(f"{self.url}/v1/models lists no model; is this an OpenAI-compatible server?")
        card = cards[0]
        self.model, self.root = card.get("id"), card.get("root") or card.get("id")
        self.max_model_len = card.get("max_model_len")
        return card

    def check(self, top_k: int, max_length: int) -> None:
        """Refuse a server that cannot do what the run needs: sequences as long as `max_length`, K log-probabilities
        per position (vLLM's `--max-logprobs`, 20 by default, caps K)."""
        if self.max_model_len is not None and self.max_model_len < max_length + 1:
            raise TeacherServerError(f"{self.url} serves {self.model} with max_model_len {self.max_model_len}, "
                                     f"shorter than --max_length {max_length}; restart it with a longer context")
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
            choices = self._choices(self._request("POST", "/v1/completions", body), len(chunk))
            return [_completion_scores(choice, prompt, completion, top_k)
                    for choice, (prompt, completion) in zip(choices, chunk)]

        return [scores for chunk in self._map(one, requests) for scores in chunk]

    def sample(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
               stop_token_ids: list[int], seeds: list[int]) -> list[list[int]]:
        """One completion per prompt, sampled by the served teacher; each ends with its stop token when it stopped."""

        def one(index):
            body = {"model": self.model, "prompt": prompts[index], "max_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "seed": seeds[index] % 2**31,
                    "stop_token_ids": stop_token_ids, "skip_special_tokens": False, "return_token_ids": True,
                    "logprobs": 0, "return_tokens_as_token_ids": True}
            (choice,) = self._choices(self._request("POST", "/v1/completions", body), 1)
            return _sampled_ids(choice, stop_token_ids)

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

    def _choices(self, response: dict, expected: int) -> list[dict]:
        choices = sorted(response.get("choices") or [], key=lambda choice: choice.get("index", 0))
        if len(choices) != expected:
            raise TeacherServerError(f"{self.url}: asked for {expected} completions, got {len(choices)}")
        return choices

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code not in RETRIED_STATUS:
                    raise TeacherServerError(f"{self.url}{path} answered HTTP {error.code}: {message}") from None
                problem = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException,
                    ValueError) as error:  # HTTPException: a server that died mid-answer; ValueError: a cut body
                problem = str(getattr(error, "reason", None) or error) or type(error).__name__
            if attempt < self.retries:
                delay = min(0.5 * 2**attempt, 30.0)
                logger.warning("teacher server %s%s: %s; retrying in %.1f s (%d of %d)", self.url, path, problem,
                               delay, attempt + 1, self.retries)
                time.sleep(delay)
        raise TeacherServerError(f"teacher server {self.url}{path} failed {self.retries + 1} times (last: {problem})")


def _error_message(error: urllib.error.HTTPError) -> str:
    """vLLM's error body: `{"error": {"message": ...}}` since 0.10.1, `{"object": "error", "message": ...}` before."""
    try:
        body = json.loads(error.read())
    except (ValueError, OSError):
        return error.reason or ""
    if isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return str(body.get("message") or body.get("detail") or body)


def _completion_scores(choice: dict, prompt: list[int], completion: list[int], top_k: int) -> dict:
    """Top-K ids, their log-probabilities, and the actual token's log-probability at each completion position."""
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(prompt) + len(completion):
        raise TeacherServerError("the teacher server returned no prompt_logprobs for every token (a vLLM server "
                                 "answers them to `prompt_logprobs`; is this one?)")
    ids, log_probs, actual = [], [], []
    for offset, token in enumerate(completion):
        entry = entries[len(prompt) + offset] or {}
        ranked = sorted(((value.get("rank") or top_k + 1, int(token_id), float(value["logprob"]))
                         for token_id, value in entry.items()), key=lambda item: (item[0], -item[2]))
        top = [(token_id, log_prob) for rank, token_id, log_prob in ranked if rank <= top_k][:top_k]
        ids.append([token_id for token_id, _ in top])
        log_probs.append([log_prob for _, log_prob in top])
        own = entry.get(str(token))
        actual.append(float(own["logprob"]) if own else float("-inf"))
    return {"ids": ids, "log_probs": log_probs, "actual": actual}


def _sampled_ids(choice: dict, stop_token_ids: list[int]) -> list[int]:
    ids = choice.get("token_ids")
    if ids is None:  # servers before vLLM 0.10.2: "token_id:123" strings through return_tokens_as_token_ids
        tokens = (choice.get("logprobs") or {}).get("tokens") or []
        if not all(isinstance(token, str) and token.startswith("token_id:") for token in tokens):
            raise TeacherServerError("the teacher server returned no token ids for a sampled completion")
        ids = [int(token.split(":", 1)[1]) for token in tokens]
    ids = list(ids)
    if choice.get("finish_reason") == "stop" and (not ids or ids[-1] not in stop_token_ids):
        reason = choice.get("stop_reason")
        ids.append(reason if isinstance(reason, int) else stop_token_ids[0])  # EOS is not always returned
    return ids


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


def check_tokenizer(server: TeacherServer, student_tokenizer, tokenizer_name: str | None, trust_remote_code: bool):
    """The served model must number tokens as the student does: load the tokenizer it names (or the one given) and
    compare the vocabularies, as for a live teacher."""
    from ..models import ModelRef, check_same_vocabulary, load_tokenizer

    name = tokenizer_name or server.root
    flag = "--teacher_tokenizer_name_or_path" if tokenizer_name else f"the served model ({server.url})"
    try:
        teacher_tokenizer = load_tokenizer(ModelRef(name, trust_remote_code=trust_remote_code, flag=flag))
    except ModelError as error:
        raise ModelError(f"{error}; pass --teacher_tokenizer_name_or_path to name the served model's "
                         "tokenizer") from None
    check_same_vocabulary(student_tokenizer, teacher_tokenizer, f"{server.url} ({name})")
