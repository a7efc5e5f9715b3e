"""The compiled generation backend against the plain one: same greedy tokens, one decode graph, LoRA merged safely.

What runs here: transformers' static-cache decode captured by TorchDynamo with the "eager" compile backend, so the
static cache, the run-wide cache length, the graph capture and the LoRA swap are exercised exactly as on GPU, without
inductor's C++ code generation (about a minute per graph on this project's 2-core CPUs). Inductor and CUDA graphs
themselves are left to `scripts/bench.py` on a GPU.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, CompileConfig

from gkd import generation
from gkd.generation import MergedLoraCopies, generate

MAX_NEW_TOKENS = 6


@pytest.fixture
def eager_compile(monkeypatch):
    """Dynamo capture without inductor; counts the graphs it builds."""

    def config(device):
        compile_config = CompileConfig(backend="eager", mode="default")
        compile_config._compile_all_devices = True
        return compile_config

    monkeypatch.setattr(generation, "compile_config", config)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def student(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[0], dtype=torch.float32)
    return model.eval()


def left_padded_prompts(width: int, rows: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of different lengths, left-padded to `width`; row 0 is the shortest."""
    generator = torch.Generator().manual_seed(seed + width)
    ids = torch.randint(5, 300, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, : width // 3] = 0
    ids[mask == 0] = 2
    return ids, mask


def greedy(model, prompt_ids, prompt_mask, **backend):
    return generate(
        model,
        prompt_ids,
        prompt_mask,
        max_new_tokens=MAX_NEW_TOKENS,
        stop_token_ids=[2],
        pad_token_id=2,
        temperature=None,
        **backend,
    )


def test_compiled_greedy_matches_plain_and_builds_one_decode_graph(student, eager_compile):
    """Prompt widths change from call to call; the cache length does not, so the decode graph is built once."""
    for width in (9, 9, 17, 30):
        prompt_ids, prompt_mask = left_padded_prompts(width)
        plain_ids, plain_mask = greedy(student, prompt_ids, prompt_mask)
        compiled_ids, compiled_mask = greedy(student, prompt_ids, prompt_mask, backend="compiled", max_cache_len=64)
        assert torch.equal(compiled_ids, plain_ids), width
        assert torch.equal(compiled_mask, plain_mask), width
    assert eager_compile() == 1


def test_compiled_backend_without_max_cache_len_sizes_the_cache_for_the_call(student, eager_compile):
    prompt_ids, prompt_mask = left_padded_prompts(12)
    assert torch.equal(
        greedy(student, prompt_ids, prompt_mask, backend="compiled")[0], greedy(student, prompt_ids, prompt_mask)[0]
    )


def test_unknown_backend_is_refused(student):
    prompt_ids, prompt_mask = left_padded_prompts(5)
    with pytest.raises(ValueError, match="plain"):
        greedy(student, prompt_ids, prompt_mask, backend="vllm")


@pytest.fixture
def lora_student(tiny_models):
    """A PEFT student whose adapters are far from zero, so an unmerged adapter would change the greedy tokens."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_models[0], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return model


def test_lora_generates_on_merged_copies_without_touching_the_base_weights(lora_student, eager_compile):
    prompt_ids, prompt_mask = left_padded_prompts(11)
    base_before = {name: p.clone() for name, p in lora_student.named_parameters() if "lora_" not in name}
    layers_before = dict(lora_student.named_modules())
    with lora_student.disable_adapter():
        base_only_ids, _ = greedy(lora_student, prompt_ids, prompt_mask)
    plain_ids, _ = greedy(lora_student, prompt_ids, prompt_mask)
    assert not torch.equal(plain_ids, base_only_ids)  # the adapter matters to the tokens

    copies = MergedLoraCopies()
    for _ in range(2):  # the second call refills the same copies
        compiled_ids, _ = greedy(
            lora_student, prompt_ids, prompt_mask, backend="compiled", max_cache_len=32, lora_copies=copies
        )
        assert torch.equal(compiled_ids, plain_ids)
    assert len(copies.copies) == sum(name.endswith(".lora_A") for name in layers_before)
    calls = {"copies": 0, "lora": 0}
    hooks = [
        copy.register_forward_hook(lambda *_: calls.update(copies=calls["copies"] + 1))
        for copy in copies.copies.values()
    ]
    hooks += [layer.register_forward_hook(lambda *_: calls.update(lora=calls["lora"] + 1)) for layer in copies.copies]
    greedy(lora_student, prompt_ids, prompt_mask, backend="compiled", max_cache_len=32, lora_copies=copies)
    for hook in hooks:
        hook.remove()
    assert calls["copies"] > 0 and calls["lora"] == 0  # prefill (eager) ran on the copies only
    assert dict(lora_student.named_modules()).keys() == layers_before.keys()  # every LoRA layer is back
    for name, parameter in lora_student.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, base_before[name]), name
    lora_student.train()  # generation runs in eval mode and gives the training mode back
    greedy(lora_student, prompt_ids, prompt_mask, backend="compiled", max_cache_len=32, lora_copies=copies)
    assert lora_student.training


def test_merged_copies_follow_the_adapter_after_an_update(lora_student, eager_compile):
    """After an optimizer step the copies hold the new W + scale * B @ A, not the weights of the first call."""
    prompt_ids, prompt_mask = left_padded_prompts(11)
    copies = MergedLoraCopies()
    greedy(lora_student, prompt_ids, prompt_mask, backend="compiled", max_cache_len=32, lora_copies=copies)
    with torch.no_grad():
        for name, parameter in lora_student.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-1.5)
    plain_ids, _ = greedy(lora_student, prompt_ids, prompt_mask)
    compiled_ids, _ = greedy(
        lora_student, prompt_ids, prompt_mask, backend="compiled", max_cache_len=32, lora_copies=copies
    )
    assert torch.equal(compiled_ids, plain_ids)
