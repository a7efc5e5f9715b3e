"""On-policy samples from an inference engine: the student's completions sampled by a vLLM server that serves the
student's base model with LoRA enabled, its adapter pushed before each on-policy window (`--rollout_server_url`).

Each push saves the trained adapter (peft `save_pretrained`, adapter weights only) into a fresh folder
`<rollout_adapter_dir>/step-N` (older folders removed), loads it with `POST /v1/load_lora_adapter`
`{"lora_name", "lora_path"}` and unloads the previous one with `POST /v1/unload_lora_adapter` `{"lora_name"}`;
completions are then sampled with `POST /v1/completions`, `model` the adapter's name, exactly as a served teacher
samples (`TeacherServer.sample`: token-id prompts, the run's `Sampling`, one seed per row, answers checked).
The server reads the folder by path, so it must see the same file system (or `--rollout_adapter_dir` on a shared one).

vLLM's contract, read in its source (vllm/entrypoints/serve/lora/api_router.py, .../serve/lora/protocol.py,
vllm/entrypoints/openai/models/serving.py): the two routes exist only when the server runs with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (otherwise FastAPI's 404 `{"detail": "Not Found"}`); success is HTTP 200 with
a plain-text body; a name already loaded is 400, an adapter that fails to load (a rank above `--max-lora-rank`:
"LoRA rank R is greater than max_lora_rank M.") 500, unloading an unknown name 404 with vLLM's error body. Full
weights have no such route: only dev-mode NCCL weight transfer (vllm/entrypoints/serve/dev/rlhf/api_router.py), so
full fine-tuning is refused (gkd/config.py).
"""

import http.client
import json
import shutil
import time
import uuid
from pathlib import Path

from . import web
from .errors import ConfigError
from .teachers.base import SampleRequest
from .teachers.server import TeacherServer, TeacherServerError, _error_message, check_tokenizer, completion_tensors

LOAD_RETRIED_STATUS = (408, 429, 502, 503, 504)  # not 500: vLLM answers a load that failed (bad adapter) with 500


class RolloutServer:
    """The client of the server that samples the student's rollouts: pushes the adapter, then samples with it."""

    def __init__(self, url: str, adapter_dir: str, rank: int = 0, timeout: float = 120.0, retries: int = 5,
                 concurrency: int = 8):
        self.http = TeacherServer(url, timeout, retries, concurrency)
        self.url = self.http.url
        self.adapter_dir = Path(adapter_dir) / f"rank-{rank}" if rank else Path(adapter_dir)
        # Names unique to this process: a resumed run may meet its predecessor's adapters still loaded.
        self.prefix = f"gkd-{uuid.uuid4().hex[:8]}-rank{rank}"
        self.loaded: str | None = None
        self.base_model: str | None = None
        self.timings: dict[str, float] = {}

    def check(self, student_tokenizer, trust_remote_code: bool, lora_r: int) -> None:
        """Before any model loads: the server lists a model whose tokenizer numbers tokens as the student's, its max
        LoRA rank (where it says) is at least `lora_r`, and it updates adapters at run time."""
        card = self.http.describe()
        self.base_model = self.http.model
        check_tokenizer(self.http, student_tokenizer, None, trust_remote_code)
        max_rank = card.get("max_lora_rank")
        if isinstance(max_rank, int) and max_rank < lora_r:
            raise ConfigError(f"--rollout_server_url {self.url} serves LoRA ranks up to {max_rank}, below --lora_r "
                              f"{lora_r}: restart it with --max-lora-rank {lora_r} or more, or lower --lora_r")
        try:  # unloading a name never loaded: vLLM with runtime LoRA updating answers its own 404 error
            answer = web.request(f"{self.url}/v1/unload_lora_adapter", "POST",
                                 json.dumps({"lora_name": f"{self.prefix}-probe"}).encode(),
                                 {"Content-Type": "application/json"}, self.http.timeout)
        except (OSError, http.client.HTTPException) as error:
            raise ConfigError(f"--rollout_server_url {self.url} went away during the start-up check: {error}") from None
        if answer.status == 404 and _error_message(answer.body) == "Not Found":
            raise ConfigError(_no_runtime_lora(self.url))

    def push(self, model, step: int) -> None:
        """Save `model`'s trained adapter for `step`, load it on the server, unload the one before."""
        started = time.perf_counter()
        folder = self.adapter_dir / f"step-{step}"
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(str(folder))
        saved = time.perf_counter()
        name = f"{self.prefix}-step-{step}"
        try:
            self.http._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())},
                               expect_json=False, retried_status=LOAD_RETRIED_STATUS)
        except TeacherServerError as error:
            if "HTTP 404" in str(error):
                raise TeacherServerError(_no_runtime_lora(self.url)) from None
            raise TeacherServerError(f"--rollout_server_url could not load the student's adapter ({error})") from None
        previous, self.loaded, self.http.model = self.loaded, name, name
        if previous is not None:
            try:
                self.http._request("POST", "/v1/unload_lora_adapter", {"lora_name": previous}, expect_json=False)
            except TeacherServerError as error:
                if "HTTP 404" not in str(error):  # already gone: nothing to free
                    raise
        for old in self.adapter_dir.glob("step-*"):
            if old != folder and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        self.timings = {"rollout_save_seconds": saved - started, "rollout_load_seconds": time.perf_counter() - saved}

    def sample(self, model, step: int, request: SampleRequest):
        """The window's completions, sampled by the server with the adapter as it is now (padded ids and mask)."""
        self.push(model, step)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(request.prompt_ids, request.prompt_mask)]
        started = time.perf_counter()
        completions = self.http.sample(prompts, request.sampling, request.seeds)
        self.timings["rollout_sampling_seconds"] = time.perf_counter() - started
        return completion_tensors(completions, request)


def _no_runtime_lora(url: str) -> str:
    return (f"--rollout_server_url {url} does not load LoRA adapters at run time (no /v1/load_lora_adapter): start "
            "vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (gkd-teacher-serve: --enable_lora)")


def open_rollouts(model_args, training_args, student_tokenizer) -> RolloutServer | None:
    """The run's rollout server, checked, or None without --rollout_server_url."""
    if not model_args.rollout_server_url:
        return None
    adapter_dir = model_args.rollout_adapter_dir or str(Path(training_args.output_dir) / "rollout_adapter")
    server = RolloutServer(model_args.rollout_server_url, adapter_dir, training_args.process_index,
                           training_args.teacher_server_timeout, training_args.teacher_server_retries,
                           training_args.teacher_server_concurrency)
    try:
        server.check(student_tokenizer, model_args.trust_remote_code, model_args.lora_r)
    except TeacherServerError as error:
        raise ConfigError(f"--rollout_server_url: {error}") from None
    return server
