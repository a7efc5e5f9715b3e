"""A minimal teacher server for CPU tests and small setups: the subset of vLLM's OpenAI-compatible API that gkd uses,
answered by a transformers model. For real teachers use vLLM (`vllm serve T --max-logprobs 100`) or SGLang.

    gkd-teacher-serve --model_name_or_path T --port 8000 [--max_logprobs 20]
    python -m gkd.tools.teacher_server ...   (the same)

Endpoints, with vLLM's request and response shapes (gkd/teachers/server.py is the client):
- GET /v1/models: `{"object": "list", "data": [{"id", "object": "model", "root", "max_model_len", "owned_by"}]}`.
- POST /v1/completions: `prompt` as token ids (one list, or a list of lists), `max_tokens`, `temperature`, `top_p`,
  `seed`, `stop_token_ids`, `prompt_logprobs`, `return_token_ids`, `n` (1 only). `prompt_logprobs` gives, for every
  prompt token after the first, the actual token's and the top-K tokens' log-probabilities (raw, temperature 1), as
  `{token id as string: {"logprob", "rank", "decoded_token"}}`; entry 0 is null. Errors are vLLM's `{"error": {...}}`.
- POST /v1/load_lora_adapter `{"lora_name", "lora_path"}` and /v1/unload_lora_adapter `{"lora_name"}`, with
  `--enable_lora` only (vLLM's routes under VLLM_ALLOW_RUNTIME_LORA_UPDATING): a peft adapter of the served model,
  sampled with when a completion names it as `model` (gkd/rollouts.py is the client). As vLLM: 200 with a plain-text
  body; a name already loaded 400, a rank above `--max_lora_rank` 500, an unknown name 404; without `--enable_lora`
  both routes are FastAPI's 404 `{"detail": "Not Found"}`.
Requests are served one at a time (a lock around the model); each request's prompts run as one padded batch. A
request whose client has closed its connection by its turn (it timed out and will ask again) is dropped, not computed:
retries do not pile up behind the lock.
"""

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Options of gkd-teacher-serve."""

    model_name_or_path: str = field(metadata={"help": "The teacher: a model folder or a Hub model id."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0 for every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on; 0 picks a free one (printed at start)."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "The model id requests must name; default: model_name_or_path."}
    )
    max_logprobs: int = field(default=20, metadata={"help": "Largest prompt_logprobs a request may ask (vLLM's)."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + completion; default: the model's max_position_embeddings."}
    )
    dtype: str = field(default="float32", metadata={"help": "Precision the model runs in.",
                                                    "choices": ["auto", "float32", "bfloat16", "float16"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    enable_lora: bool = field(default=False, metadata={
        "help": "Serve LoRA adapters loaded at run time (/v1/load_lora_adapter): the student's rollouts "
                "(gkd-train --rollout_server_url)."})
    max_lora_rank: int = field(default=16, metadata={"help": "Largest LoRA rank an adapter may have (vLLM's)."})

    def __post_init__(self):
        from gkd.errors import ConfigError

        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_logprobs < 1:
            raise ConfigError(f"--max_logprobs must be at least 1, got {self.max_logprobs}")
        if self.max_lora_rank < 1:
            raise ConfigError(f"--max_lora_rank must be at least 1, got {self.max_lora_rank}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max_model_len must be at least 2, got {self.max_model_len}")


class ClientGone(Exception):
    """The client closed its connection while its request waited: nobody will read the answer."""


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


class Teacher:
    """The model behind the API, and the two things it computes."""

    def __init__(self, config: ServeConfig):
        from gkd import models

        ref = models.ModelRef(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        models.check_model(ref)
        self.tokenizer = models.load_tokenizer(ref)
        self.model = models.load_frozen(ref, config.dtype)
        self.name = config.served_model_name or config.model_name_or_path
        local = Path(config.model_name_or_path).expanduser()
        # an absolute path, as a client on another working directory must read it (vLLM reports what it was given)
        self.root = str(local.resolve()) if local.is_dir() else config.model_name_or_path
        self.max_logprobs = config.max_logprobs
        self.max_model_len = config.max_model_len or self.model.config.get_text_config().max_position_embeddings
        self.lock = threading.Lock()
        self.enable_lora, self.max_lora_rank = config.enable_lora, config.max_lora_rank
        self.adapters: dict[str, str] = {}  # name -> path, loaded into `self.model` (a PeftModel once one is)

    def card(self) -> dict:
        card = {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "gkd", "root": self.root,
                "parent": None, "max_model_len": self.max_model_len}
        if self.enable_lora:
            card["max_lora_rank"] = self.max_lora_rank  # gkd's addition: vLLM does not list it
        return card

    def load_adapter(self, body: dict) -> str:
        """vLLM's load_lora_adapter: the adapter in `lora_path` under `lora_name`."""
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path or not isinstance(name, str) or not isinstance(path, str):
            raise RequestError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.adapters:
            raise RequestError(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        try:
            with open(f"{path}/adapter_config.json") as handle:
                adapter_config = json.load(handle)
        except (OSError, ValueError) as error:
            raise RequestError(500, f"Loading lora {path} failed: {error}", "InternalServerError") from None
        rank = max([adapter_config.get("r", 0), *(adapter_config.get("rank_pattern") or {}).values()])
        if rank > self.max_lora_rank:
            raise RequestError(500, f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.",
                               "InternalServerError")
        from peft import PeftModel

        with self.lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self.adapters[name] = path
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict) -> str:
        """vLLM's unload_lora_adapter; the last one gone, the plain model serves again."""
        name = body.get("lora_name")
        if not name:
            raise RequestError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        if name not in self.adapters:
            raise RequestError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        with self.lock:
            del self.adapters[name]
            if self.adapters:
                if name in self.model.active_adapters:
                    self.model.set_adapter(next(iter(self.adapters)))
                self.model.delete_adapter(name)
            else:
                self.model = self.model.unload()
        return f"Success: LoRA adapter '{name}' removed successfully."

    def complete(self, body: dict, client_gone=lambda: False) -> dict:
        """A /v1/completions answer; `client_gone()` is asked once the request has the model, before it runs."""
        prompts = self._prompts(body)
        max_tokens = _int(body, "max_tokens", 16)
        prompt_logprobs = body.get("prompt_logprobs")
        adapter = body.get("model") if body.get("model") in self.adapters else None
        if body.get("model") not in (None, self.name) and adapter is None:
            raise RequestError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if _int(body, "n", 1) != 1:
            raise RequestError(400, "this server answers n = 1 only")
        if max_tokens < 1:
            raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}.")
        if prompt_logprobs is not None:
            prompt_logprobs = _int(body, "prompt_logprobs", 0)
            if prompt_logprobs < 0:
                raise RequestError(400, "`prompt_logprobs` must be a positive value.")
            if prompt_logprobs > self.max_logprobs:
                raise RequestError(400, f"Requested prompt logprobs of {prompt_logprobs}, which is greater than max "
                                        f"allowed: {self.max_logprobs}")
        for prompt in prompts:
            if len(prompt) + max_tokens > self.max_model_len:
                raise RequestError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                                        f"request has {len(prompt)} prompt tokens and asks for {max_tokens} more.")
        with self.lock, torch.no_grad(), self._with_adapter(adapter):
            if client_gone():
                raise ClientGone
            if prompt_logprobs is not None:
                scored, last_logits = zip(*(self._prompt_logprobs(p, prompt_logprobs) for p in prompts))
            else:
                scored, last_logits = [None] * len(prompts), None
            if max_tokens == 1 and last_logits is not None:  # scoring: the one new token from the same forward
                sampled = [self._next_token(logits, body) for logits in last_logits]
            else:
                sampled = self._sample(prompts, max_tokens, body)
        choices = []
        for index, (prompt, (ids, finish_reason), scores) in enumerate(zip(prompts, sampled, scored)):
            choice = {"index": index, "text": self.tokenizer.decode(ids, skip_special_tokens=True), "logprobs": None,
                      "finish_reason": finish_reason, "stop_reason": None, "prompt_logprobs": scores}
            if body.get("return_token_ids"):
                choice.update(token_ids=ids, prompt_token_ids=prompt)
            choices.append(choice)
        completion_tokens = sum(len(ids) for ids, _ in sampled)
        prompt_tokens = sum(map(len, prompts))
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _with_adapter(self, adapter: str | None):
        """The model as a request names it: with one loaded adapter, or the plain model."""
        import contextlib

        if not self.adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        elif isinstance(prompt, list) and prompt and all(isinstance(token, int) for token in prompt):
            prompt = [prompt]
        if not (isinstance(prompt, list) and prompt and all(
                isinstance(ids, list) and ids and all(isinstance(t, int) and t >= 0 for t in ids) for ids in prompt)):
            raise RequestError(400, "prompt must be a string, a list of token ids, or a list of such lists")
        vocab_size = self.model.get_input_embeddings().weight.shape[0]
        if any(token >= vocab_size for ids in prompt for token in ids):
            raise RequestError(400, f"token id out of range for a vocabulary of {vocab_size}")
        return prompt

    def _next_token(self, logits: torch.Tensor, body: dict) -> tuple[list[int], str]:
        temperature = float(body.get("temperature", 1.0))
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1))
        stop_ids = set(body.get("stop_token_ids") or []) | {self.tokenizer.eos_token_id}
        return [token], "stop" if token in stop_ids else "length"

    def _prompt_logprobs(self, prompt: list[int], k: int) -> tuple[list, torch.Tensor]:
        """vLLM's prompt_logprobs: None for the first token; then the actual token (its true rank) and the top k.
        Also the last position's logits, from which a one-token completion is drawn."""
        logits = self.model(input_ids=torch.tensor([prompt])).logits[0].float()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
        actual = torch.tensor(prompt[1:])
        actual_log_probs = log_probs.gather(1, actual[:, None])[:, 0]
        ranks = (log_probs > actual_log_probs[:, None]).sum(dim=1) + 1
        top = log_probs.topk(k, dim=-1) if k > 0 else None
        entries = [None]
        for position, token in enumerate(prompt[1:]):
            entry = {str(token): self._logprob(token, actual_log_probs[position], int(ranks[position]))}
            if top is not None:
                for rank, (token_id, value) in enumerate(zip(top.indices[position].tolist(),
                                                             top.values[position]), start=1):
                    entry.setdefault(str(token_id), self._logprob(token_id, value, rank))
            entries.append(entry)
        return entries, logits[-1]

    def _logprob(self, token: int, value: torch.Tensor, rank: int) -> dict:
        return {"logprob": max(float(value), -9999.0), "rank": rank, "decoded_token": self.tokenizer.decode([token])}

    def _sample(self, prompts: list[list[int]], max_tokens: int, body: dict) -> list[tuple[list[int], str]]:
        from gkd.batching import pad_batch

        stop_ids = sorted(set(body.get("stop_token_ids") or []) | {self.tokenizer.eos_token_id} - {None})
        temperature = float(body.get("temperature", 1.0))
        if "seed" in body and body["seed"] is not None:
            torch.manual_seed(int(body["seed"]))
        batch = pad_batch([{"prompt_ids": p, "completion_ids": []} for p in prompts], self.tokenizer.pad_token_id)
        sampling = {"do_sample": False} if temperature == 0 else {
            "do_sample": True, "temperature": temperature, "top_p": float(body.get("top_p", 1.0)), "top_k": 0}
        output = self.model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                                     max_new_tokens=max_tokens, eos_token_id=stop_ids,
                                     pad_token_id=self.tokenizer.pad_token_id, **sampling)
        results = []
        for row in output[:, batch["prompt_ids"].shape[1]:].tolist():
            stop = next((index for index, token in enumerate(row) if token in stop_ids), None)
            results.append((row[: stop + 1], "stop") if stop is not None else (row, "length"))
        return results


def _int(body: dict, key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{key} must be an integer, got {value!r}")
    return value


def make_handler(teacher: Teacher):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [teacher.card()]})
            elif self.path.rstrip("/") in ("/health", ""):
                self._send(200, {})
            else:
                self._send(404, _error(404, f"no route {self.path}", "NotFoundError"))

        def do_POST(self):
            path = self.path.rstrip("/")
            adapters = {"/v1/load_lora_adapter": teacher.load_adapter,
                        "/v1/unload_lora_adapter": teacher.unload_adapter}
            if path in adapters and not teacher.enable_lora:  # vLLM without runtime LoRA updating: no such route
                self._send(404, {"detail": "Not Found"})
                return
            if path != "/v1/completions" and path not in adapters:
                self._send(404, _error(404, f"no route {self.path}", "NotFoundError"))
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise RequestError(400, "the request body must be a JSON object")
                if path in adapters:
                    self._send_text(200, adapters[path](body))
                else:
                    self._send(200, teacher.complete(body, self._client_gone))
            except ClientGone:
                logger.info("%s closed its connection before its turn: request dropped", self.address_string())
                self.close_connection = True
            except RequestError as error:
                self._send(error.status, _error(error.status, str(error), error.kind))
            except ValueError as error:
                self._send(400, _error(400, f"invalid JSON: {error}"))

        def _client_gone(self) -> bool:
            return connection_closed(self.connection)

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_text(self, status: int, text: str):
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):
            logger.debug("%s %s", self.address_string(), format % args)

    return Handler


def connection_closed(connection) -> bool:
    """Whether the peer has closed `connection` (a socket): readable with nothing to read. A client that sent its
    next request on the same connection (keep-alive) is still there."""
    import select
    import socket

    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the peer
        return True


def _error(status: int, message: str, kind: str = "BadRequestError") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse, quiet_libraries
    from gkd.errors import ConfigError

    (config,) = parse(ServeConfig, argv, description=__doc__.splitlines()[0])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_libraries()
    teacher = Teacher(config)
    try:
        server = ThreadingHTTPServer((config.host, config.port), make_handler(teacher))
    except OSError as error:  # in use, not an address of this machine, not allowed
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {error.strerror or error}") from None
    host, port = server.server_address[:2]
    print(f"serving {teacher.name} at http://{host}:{port} (the OpenAI API under /v1; max_logprobs "
          f"{teacher.max_logprobs}): train with --teacher_server_url http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":  # `python -m gkd.tools.teacher_server`; `gkd-teacher-serve` runs gkd.cli.command
    from gkd.cli import run

    run(main)
