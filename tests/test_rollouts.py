"""The student's on-policy samples from a server (--rollout_server_url, gkd/rollouts.py), over real HTTP against the
shipped server (gkd-teacher-serve --enable_lora) on a thread of this process."""

import re
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch
from helpers import assert_ok, metrics, refused, run_cli, train_args, train_until_a_server_is_lost

from gkd import train
from gkd.batching import pad_batch
from gkd.errors import ConfigError
from gkd.generation import generate
from gkd.rollouts import RolloutServer
from gkd.sampling import Sampling
from gkd.teachers import SampleRequest
from gkd.teachers.server import TeacherServerError
from gkd.tools.teacher_server import ServeConfig, make_handler
from gkd.tools.teacher_server import Teacher as ServedModel


def serve(student, **options):
    """The shipped server for `student` on a free port: (its URL, the HTTP server, the served model)."""
    served = ServedModel(ServeConfig(model_name_or_path=str(student), port=0, **options))
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server, served


@pytest.fixture(scope="module")
def lora_server(tiny_models):
    url, server, served = serve(tiny_models[0], enable_lora=True, max_lora_rank=8)
    yield url, served
    server.shutdown()
    server.server_close()


@pytest.fixture
def student(tiny_models):
    """(tokenizer, the student with a rank-4 adapter whose B is not zero, so the adapter changes its samples)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[0], dtype=torch.float32)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return tokenizer, get_peft_model(model, config)


def request_for(tokenizer, texts, sampling, seeds) -> SampleRequest:
    """Left-padded prompts (the trainer's shape) of different lengths, one seed each."""
    batch = pad_batch([{"prompt_ids": tokenizer(text)["input_ids"], "completion_ids": []} for text in texts],
                      tokenizer.pad_token_id)
    return SampleRequest(batch["prompt_ids"], batch["prompt_mask"], sampling, seeds, len(tokenizer), None)


def sampling_of(tokenizer, temperature) -> Sampling:
    return Sampling(max_new_tokens=8, stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                    temperature=temperature)


def test_greedy_rollouts_equal_local_generation(lora_server, student, tmp_path):
    url, served = lora_server
    tokenizer, model = student
    rollouts = RolloutServer(url, tmp_path / "adapters")
    rollouts.check(tokenizer, False, 4)
    sampling = sampling_of(tokenizer, None)
    request = request_for(tokenizer, ["the capital of france is", "name a colour"], sampling, [1, 2])
    differs = []
    for step in (0, 1):
        served_ids, served_mask = rollouts.sample(model, step, request)
        local_ids, local_mask = generate(model, request.prompt_ids, request.prompt_mask, sampling)
        for row in range(2):
            assert served_ids[row][served_mask[row].bool()].tolist() == local_ids[row][local_mask[row].bool()].tolist()
        with model.disable_adapter():  # the adapter matters: without it the samples differ
            base_ids, _ = generate(model, request.prompt_ids, request.prompt_mask, sampling)
        differs.append(not torch.equal(base_ids, local_ids))
        with torch.no_grad():  # the next step's adapter samples otherwise
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(torch.randn_like(parameter))
    assert [path.name for path in (tmp_path / "adapters").iterdir()] == ["step-1"]
    assert list(served.adapters) == [rollouts.loaded]
    assert all(differs), differs


def test_the_same_seed_gives_the_same_rollouts(lora_server, student, tmp_path):
    url, _ = lora_server
    tokenizer, model = student
    rollouts = RolloutServer(url, tmp_path / "adapters")
    rollouts.check(tokenizer, False, 4)
    request = request_for(tokenizer, ["say hello", "name an animal", "two plus two"], sampling_of(tokenizer, 1.0),
                          [11, 12, 13])
    first = rollouts.sample(model, 0, request)
    second = rollouts.sample(model, 1, request)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_an_adapter_above_the_servers_rank_is_refused(tiny_models, student, tmp_path):
    tokenizer, model = student
    url, server, _ = serve(tiny_models[0], enable_lora=True, max_lora_rank=2)
    try:
        with pytest.raises(ConfigError, match="serves LoRA ranks up to 2, below --lora_r 4") as refusal:
            RolloutServer(url, tmp_path / "a").check(tokenizer, False, 4)
        assert "\n" not in str(refusal.value)
        with pytest.raises(TeacherServerError, match="LoRA rank 4 is greater than max_lora_rank 2") as failure:
            RolloutServer(url, tmp_path / "b").push(model, 0)  # the load itself, as vLLM refuses it
        assert "\n" not in str(failure.value)
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_without_lora_is_refused(capfd, tiny_models, chat_data, student, tmp_path):
    tokenizer, model = student
    url, server, _ = serve(tiny_models[0])
    try:
        argv = train_args(*tiny_models, chat_data, tmp_path / "out", "--lmbda", "1", "--use_peft",
                          "--rollout_server_url", url)[1:]
        refused(capfd, train.main, argv, "does not load LoRA adapters at run time", "--enable_lora")
        with pytest.raises(ConfigError, match="does not load LoRA adapters at run time") as refusal:
            RolloutServer(url, tmp_path / "a").check(tokenizer, False, 4)
        assert "\n" not in str(refusal.value)
        with pytest.raises(TeacherServerError, match="does not load LoRA adapters at run time"):
            RolloutServer(url, tmp_path / "b").push(model, 0)
    finally:
        server.shutdown()
        server.server_close()


def test_full_fine_tuning_with_a_rollout_server_is_refused(capfd, tiny_models, chat_data, tmp_path):
    argv = train_args(*tiny_models, chat_data, tmp_path / "out", "--lmbda", "1",
                      "--rollout_server_url", "http://127.0.0.1:9")[1:]
    refused(capfd, train.main, argv, "--rollout_server_url needs --use_peft", "no route to reload")


def test_a_run_trains_on_rollouts_from_the_server(lora_server, tiny_models, chat_data, tmp_path):
    url, served = lora_server
    output_dir = tmp_path / "out"
    result = run_cli(train_args(*tiny_models, chat_data, output_dir, "--lmbda", "1", "--use_peft", "--lora_r", "4",
                                "--rollout_server_url", url))
    assert_ok(result)
    steps = metrics(output_dir)
    assert len(steps) == 2 and all(step["on_policy"] == 1.0 for step in steps), steps
    assert all("rollout_sampling_seconds" in step for step in steps), steps
    assert [path.name for path in (output_dir / "rollout_adapter").iterdir()] == ["step-1"]
    ours = [path for path in served.adapters.values() if path.startswith(str(output_dir))]  # the previous unloaded
    assert ours == [str((output_dir / "rollout_adapter" / "step-1").resolve())], served.adapters


def test_a_rollout_server_that_goes_away_stops_the_run_with_a_checkpoint(tiny_models, chat_data, tmp_path):
    url, server, _ = serve(tiny_models[0], enable_lora=True)
    out = tmp_path / "run"
    args = train_args(*tiny_models, chat_data, out, "--lmbda", "1", "--use_peft", "--lora_r", "4",
                      "--rollout_server_url", url, "--max_steps", "100000", "--teacher_server_retries", "1")
    line = train_until_a_server_is_lost(args, out, lambda: (server.shutdown(), server.server_close()))
    step = int(re.search(r"checkpoint-(\d+)", line).group(1))
    assert step >= 2
    assert len(metrics(out)) == step  # no step trained on samples that never came
