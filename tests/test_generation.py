"""gkd's own decode loop (static and compiled backends) against transformers' `generate` (plain): same greedy tokens,
one decode graph for a whole run, the same sampling distribution, LoRA merged safely, a compiler failure survived.

What runs here: the decode step captured by TorchDynamo with the "eager" compile backend and `fullgraph=True`, so the
static cache, the run-wide cache length, batch padding, in-graph sampling and the LoRA swap are exercised as on a GPU,
and any graph break fails the test, without inductor's C++ code generation (about a minute per graph on this
project's 2-core CPUs). Inductor and CUDA graphs themselves are left to `scripts/bench.py` on a GPU.
"""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from gkd.decoding import StaticDecoder, logit_bias, sample_next, top_p_filter
from gkd.generation import MergedLoraCopies, generate
from gkd.sampling import Sampling

MAX_NEW_TOKENS = 6
STOP = 2  # <|im_end|>: eos and pad of the tiny tokenizer


@pytest.fixture
def graphs():
    """Counts the graphs TorchDynamo captures while the test runs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def eager_capture() -> StaticDecoder:
    """A compiled decoder whose decode step must be captured whole (no graph break), without code generation."""
    return StaticDecoder({"backend": "eager", "fullgraph": True})


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
    ids[mask == 0] = STOP
    return ids, mask


def sampling(max_new_tokens=MAX_NEW_TOKENS, stops=(STOP,), temperature=None, **settings) -> Sampling:
    return Sampling(max_new_tokens, stops, STOP, temperature=temperature, **settings)


def greedy(model, prompt_ids, prompt_mask, max_new_tokens=MAX_NEW_TOKENS, decoder=None, lora_copies=None, **settings):
    return generate(model, prompt_ids, prompt_mask, sampling(max_new_tokens, **settings), decoder=decoder,
                    lora_copies=lora_copies)


# ---------------------------------------------------------------- the decode loop against transformers' generate


@pytest.mark.parametrize("backend", ["static", "compiled"])
def test_greedy_matches_plain_and_the_decode_graph_is_built_once(student, graphs, backend):
    """Prompt widths and batch sizes change from call to call; the decode graph is captured once for all of them."""
    decoder = eager_capture() if backend == "compiled" else StaticDecoder()
    for width, rows in ((9, 3), (9, 3), (17, 3), (30, 2), (12, 1)):
        prompt_ids, prompt_mask = left_padded_prompts(width, rows)
        plain_ids, plain_mask = greedy(student, prompt_ids, prompt_mask)
        ours_ids, ours_mask = greedy(student, prompt_ids, prompt_mask, backend=backend, max_cache_len=64,
                                     decoder=decoder)
        assert torch.equal(ours_ids, plain_ids), (width, rows)
        assert torch.equal(ours_mask, plain_mask), (width, rows)
    if backend == "compiled":
        assert list(decoder.caches) == [(3, 64)]  # one run-wide length; smaller batches padded into the first cache
        assert graphs() == 1
    else:
        assert list(decoder.caches) == [(1, 32)]  # sized to the last call: 12 + 6 tokens, rounded up to 32
        assert graphs() == 0


def test_rows_that_stop_early_are_masked_and_padded_like_plain(student):
    """Stop ids taken from the greedy output itself, so rows stop at different steps: later ids are pad, masks agree."""
    prompt_ids, prompt_mask = left_padded_prompts(9)
    free_run, _ = greedy(student, prompt_ids, prompt_mask, max_new_tokens=24)
    stops = [STOP, int(free_run[0, 3]), int(free_run[1, 7])]
    plain_ids, plain_mask = generate(student, prompt_ids, prompt_mask, sampling(24, stops))
    assert plain_mask.sum(dim=1).min() <= 4, "the test needs a row that stops early"
    ours_ids, ours_mask = generate(student, prompt_ids, prompt_mask, sampling(24, stops, backend="static"))
    width = plain_ids.shape[1]
    assert torch.equal(ours_ids[:, :width], plain_ids) and torch.equal(ours_mask[:, :width], plain_mask)
    assert not ours_mask[:, width:].any() and (ours_ids[:, width:] == STOP).all()


def test_stop_check_ends_the_loop_once_every_row_has_stopped(student):
    """Every row stops at once when the stop token is the only allowed id: the loop ends at the next check."""
    prompt_ids, prompt_mask = left_padded_prompts(9)
    vocab = student.config.vocab_size
    only_stop = [token for token in range(vocab) if token != STOP]
    decoder = StaticDecoder(check_stop_every=4)
    completion_ids = decoder.generate(student, prompt_ids, prompt_mask,
                                      sampling(30, temperature=1.0, suppress_ids=only_stop, max_cache_len=64))
    assert completion_ids.shape[1] == 4 and (completion_ids == STOP).all()


@pytest.mark.parametrize("backend", ["plain", "static"])
def test_min_new_tokens_and_suppressed_ids_are_honoured(student, backend):
    """`Sampling.min_new_tokens` and `suppress_ids` (how the trainer keeps samples inside the vocabulary both models
    share) hold for the static loop as for transformers' generate."""
    prompt_ids, prompt_mask = left_padded_prompts(9)
    torch.manual_seed(0)
    completion_ids, completion_mask = generate(student, prompt_ids, prompt_mask, sampling(
        20, temperature=1.0, min_new_tokens=20, suppress_ids=range(100, 300), backend=backend))
    assert completion_mask.all() and completion_ids.shape == (3, 20)
    assert not (completion_ids == STOP).any() and (completion_ids < 100).all()


def test_the_generation_config_does_not_act_behind_sampling(student):
    """Only `Sampling` decides what is sampled: a `suppress_tokens` left in the model's generation config (the old
    side channel) is not read by either backend."""
    prompt_ids, prompt_mask = left_padded_prompts(9)
    expected = greedy(student, prompt_ids, prompt_mask)[0]
    student.generation_config.suppress_tokens = [int(token) for token in expected.flatten().unique()]
    try:
        for backend in ("plain", "static"):
            assert torch.equal(greedy(student, prompt_ids, prompt_mask, backend=backend)[0], expected), backend
    finally:
        student.generation_config.suppress_tokens = None


def test_unknown_backend_is_refused(student):
    prompt_ids, prompt_mask = left_padded_prompts(5)
    with pytest.raises(ValueError, match="plain, static, compiled"):
        greedy(student, prompt_ids, prompt_mask, backend="vllm")


def test_a_compiler_failure_warns_once_and_decodes_uncompiled(student, caplog):
    """A compile backend that does not exist fails inside torch.compile: the decoder must go on, not the run die."""
    prompt_ids, prompt_mask = left_padded_prompts(9)
    decoder = StaticDecoder({"backend": "no_such_compiler_backend"})
    with caplog.at_level(logging.WARNING, logger="gkd.decoding"):
        ours_ids, _ = greedy(student, prompt_ids, prompt_mask, backend="compiled", decoder=decoder)
        again_ids, _ = greedy(student, prompt_ids, prompt_mask, backend="compiled", decoder=decoder)
    plain_ids, _ = greedy(student, prompt_ids, prompt_mask)
    assert torch.equal(ours_ids, plain_ids) and torch.equal(again_ids, plain_ids)
    warnings = [record for record in caplog.records if "compiling the decode step failed" in record.message]
    assert len(warnings) == 1 and not decoder.compiled


# ---------------------------------------------------------------- sampling inside the graph


def test_top_p_filter_equals_transformers_warper():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 50, generator=generator)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        expected = TopPLogitsWarper(top_p=top_p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, top_p), expected), top_p


def test_sampling_draws_from_the_tempered_distribution():
    """argmax(p / Exp(1)) is a draw from p: frequencies over 40,000 draws match softmax(logits / T) (4 sigma)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0]])
    bias = torch.zeros(6)
    bias[5] = float("-inf")  # a suppressed id is never drawn
    temperature, draws = 0.7, 40_000
    torch.manual_seed(0)
    tokens = sample_next(logits.expand(draws, -1), bias, temperature, top_p=1.0)
    frequencies = torch.bincount(tokens, minlength=6).double() / draws
    expected = torch.softmax((logits[0] + bias).double() / temperature, dim=-1)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert frequencies[5] == 0
    assert ((frequencies - expected).abs() <= 4 * sigma + 1e-12).all(), (frequencies, expected)


def test_greedy_sampling_is_argmax_after_the_bias():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    bias = torch.tensor([0.0, float("-inf"), 0.0])
    assert sample_next(logits, bias, None, 1.0).tolist() == [2, 0]


def test_logit_bias_holds_stops_back_only_before_min_new_tokens():
    early, always = logit_bias(8, suppress_ids=[6, 7, 99], stop_ids=[2, 3])
    assert torch.isinf(early).nonzero().flatten().tolist() == [2, 3, 6, 7]
    assert torch.isinf(always).nonzero().flatten().tolist() == [6, 7]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_completions_equal_transformers_generate_from_the_same_seed(student, temperature):
    """On CPU, torch's one-sample `multinomial` is the same exponential race as `sample_next`, drawing from the global
    RNG in the same order: from one seed, the static loop samples exactly the tokens transformers' `generate` does."""
    prompt_ids, prompt_mask = left_padded_prompts(9)
    samples = {}
    for backend in ("plain", "static"):
        torch.manual_seed(7)
        samples[backend] = generate(student, prompt_ids, prompt_mask,
                                    sampling(12, temperature=temperature, backend=backend))
    assert torch.equal(samples["static"][0], samples["plain"][0])
    assert torch.equal(samples["static"][1], samples["plain"][1])


def test_sampled_completions_are_reproducible_from_the_seed(student):
    prompt_ids, prompt_mask = left_padded_prompts(9)

    def sample():
        torch.manual_seed(123)
        return generate(student, prompt_ids, prompt_mask, sampling(12, temperature=1.0, backend="static"))[0]

    assert torch.equal(sample(), sample())


# ---------------------------------------------------------------- LoRA: decoding on merged copies


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


def test_lora_generates_on_merged_copies_without_touching_the_base_weights(lora_student, graphs):
    prompt_ids, prompt_mask = left_padded_prompts(11)
    base_before = {name: p.clone() for name, p in lora_student.named_parameters() if "lora_" not in name}
    layers_before = dict(lora_student.named_modules())
    with lora_student.disable_adapter():
        base_only_ids, _ = greedy(lora_student, prompt_ids, prompt_mask)
    plain_ids, _ = greedy(lora_student, prompt_ids, prompt_mask)
    assert not torch.equal(plain_ids, base_only_ids)  # the adapter matters to the tokens

    copies, decoder = MergedLoraCopies(), eager_capture()
    backend = dict(backend="compiled", max_cache_len=32, decoder=decoder, lora_copies=copies)
    for _ in range(2):  # the second call refills the same copies
        compiled_ids, _ = greedy(lora_student, prompt_ids, prompt_mask, **backend)
        assert torch.equal(compiled_ids, plain_ids)
    assert graphs() == 1
    assert len(copies.copies) == sum(name.endswith(".lora_A") for name in layers_before)
    calls = {"copies": 0, "lora": 0}
    hooks = [
        copy.register_forward_hook(lambda *_: calls.update(copies=calls["copies"] + 1))
        for copy in copies.copies.values()
    ]
    hooks += [layer.register_forward_hook(lambda *_: calls.update(lora=calls["lora"] + 1)) for layer in copies.copies]
    greedy(lora_student, prompt_ids, prompt_mask, backend="static", max_cache_len=32, lora_copies=copies)
    for hook in hooks:
        hook.remove()
    assert calls["copies"] > 0 and calls["lora"] == 0  # prefill and decode ran on the copies only
    assert dict(lora_student.named_modules()).keys() == layers_before.keys()  # every LoRA layer is back
    for name, parameter in lora_student.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, base_before[name]), name
    lora_student.train()  # generation runs in eval mode and gives the training mode back
    greedy(lora_student, prompt_ids, prompt_mask, **backend)
    assert lora_student.training


def test_merged_copies_follow_the_adapter_after_an_update(lora_student, graphs):
    """After an optimizer step the copies hold the new W + scale * B @ A, not the weights of the first call."""
    prompt_ids, prompt_mask = left_padded_prompts(11)
    backend = dict(backend="compiled", max_cache_len=32, decoder=eager_capture(), lora_copies=MergedLoraCopies())
    greedy(lora_student, prompt_ids, prompt_mask, **backend)
    with torch.no_grad():
        for name, parameter in lora_student.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-1.5)
    plain_ids, _ = greedy(lora_student, prompt_ids, prompt_mask)
    assert torch.equal(greedy(lora_student, prompt_ids, prompt_mask, **backend)[0], plain_ids)
    assert graphs() == 1  # same copies, same addresses: no new capture after the update


# ---------------------------------------------------------------- in the trainer: one decode graph for the whole run


def test_on_policy_training_captures_the_decode_step_once(tiny_models, tmp_path, graphs):
    """Regression: TRL's forward redirection left `forward` in the student's `__dict__` after the first training
    step, a guard of the compiled decode step failed, and the step was captured again (a second CUDA graph on GPU)."""
    from datasets import Dataset
    from tiny import load_student_and_teacher

    from gkd.config import GKDConfig
    from gkd.teachers.live import LiveTeacher
    from gkd.trainer import STUDENT, GKDTrainer

    tokenizer, student, teacher = load_student_and_teacher(tiny_models)
    args = GKDConfig(
        output_dir=str(tmp_path), lmbda=1.0, max_new_tokens=5, max_length=24, per_device_train_batch_size=2,
        max_steps=3, report_to="none", save_strategy="no", logging_strategy="no", generation_backend="compiled",
        disable_tqdm=True,
    )
    samples = [{"prompt_ids": [5, 6, 7 + row, 8], "completion_ids": [9, 10, 2]} for row in range(6)]
    trainer = GKDTrainer(
        model=student, teacher=LiveTeacher.from_options(teacher, args), args=args, stop_token_ids=[STOP],
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(samples),
    )
    assert trainer.generation_backend == "compiled"
    trainer._decoders[STUDENT] = eager_capture()  # dynamo's capture without inductor's minute of code generation
    trainer.train()
    assert trainer.state.global_step == 3 and trainer._decoders[STUDENT].compiled
    assert graphs() == 1
    assert "forward" not in vars(student)
