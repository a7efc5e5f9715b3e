"""Completions for a batch of left-padded prompts, stopped and masked at the first stop token.

Always with a KV cache: TRL 1.16's GKDTrainer passes `use_cache=False` whenever gradient checkpointing is on, which
re-runs the whole prefix for every new token.

Three backends, the same samples (greedy outputs agree, tests/test_generation.py):
- "plain": transformers' `generate` with a dynamic KV cache, on the model as it trains (LoRA adapters unmerged). The
  reference path, and the one DeepSpeed ZeRO-3 uses (its ranks step together through `synced_gpus`).
- "static": gkd's own decode loop over a static KV cache (`gkd/decoding.py`), uncompiled. Faster than "plain" on CPU.
- "compiled": the same loop with its decode step captured by `torch.compile` (CUDA graphs on GPU), built once in the
  first call.
With "static" and "compiled", LoRA layers are swapped for plain Linears holding W + scale * B @ A during generation
(`MergedLoraCopies`), so decoding pays nothing for the adapter.
"""

from contextlib import contextmanager

import torch

from .batching import mask_after_stop
from .decoding import StaticDecoder
from .sampling import Sampling


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling, *,
             decoder: StaticDecoder | None = None, lora_copies: "MergedLoraCopies | None" = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One completion per prompt, sampled as `sampling` says (its backend: module docstring).

    Pass the same `decoder` and `lora_copies` on every call of a run so cache, decode graph and merged copies are
    built once. Only `sampling` decides what is sampled: the model's generation config is not read (its
    `suppress_tokens` or `min_new_tokens` would otherwise act behind the caller's back). Returns completion ids
    [B, C] and a mask that keeps each row's first stop token and nothing after it; ids after it are the pad id."""
    was_training = model.training
    model.eval()
    try:
        if sampling.backend == "plain":
            completion_ids = _transformers_generate(model, prompt_ids, prompt_mask, sampling)
        else:
            if decoder is None:
                compiled = sampling.backend == "compiled"
                decoder = StaticDecoder(default_compile_options(prompt_ids.device) if compiled else None)
            with (lora_copies or MergedLoraCopies()).swapped_in(model):
                completion_ids = decoder.generate(model, prompt_ids, prompt_mask, sampling)
    finally:
        model.train(was_training)
    pad_token_id = sampling.pad_token_id
    if completion_ids.shape[1] == 0:  # nothing generated: keep one masked column so shapes stay valid
        completion_ids = torch.full_like(prompt_ids[:, :1], pad_token_id)
        return completion_ids, torch.zeros_like(completion_ids)
    completion_mask = mask_after_stop(completion_ids, torch.ones_like(completion_ids), list(sampling.stop_token_ids))
    return completion_ids.masked_fill(completion_mask == 0, pad_token_id), completion_mask


def _transformers_generate(model, prompt_ids, prompt_mask, sampling: Sampling) -> torch.Tensor:
    randomness = {"do_sample": False} if sampling.temperature is None else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0
    }
    sequences = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens or None,
        eos_token_id=list(sampling.stop_token_ids),
        pad_token_id=sampling.pad_token_id,
        use_cache=True,
        suppress_tokens=list(sampling.suppress_ids) or None,
        **randomness,
    )
    return sequences[:, prompt_ids.shape[1] :]


def resolve_backend(requested: str, device: torch.device, zero3: bool) -> str:
    """The run's one decision: 'auto' -> compiled on CUDA, static elsewhere. Always plain under ZeRO-3: the ranks must
    step through the decode together (`synced_gpus`) and the gathered weights get new addresses every generation."""
    if requested == "auto":
        requested = "compiled" if device.type == "cuda" else "static"
    return "plain" if zero3 else requested


def default_compile_options(device: torch.device) -> dict:
    """CUDA graphs on GPU ("reduce-overhead": one graph replay per token); inductor's default mode elsewhere."""
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {"mode": "default"}


class MergedLoraCopies:
    """Plain `nn.Linear` copies of a PEFT model's LoRA layers, holding W + scale * B @ A, swapped in for generation.

    Not peft's `merge_adapter()`/`unmerge_adapter()`: they add the delta into the frozen base weight and subtract it
    again, which in bf16 does not give W back, so the base weights would drift a little every optimizer step. Here the
    base weights are never written. The copies persist across calls (refilled in place each call) because the CUDA
    graphs of the compiled decode read weights at fixed addresses. Layers this cannot merge exactly (DoRA, LoRA
    biases, non-Linear bases, already merged) keep running unmerged, which is slower but samples the same model.
    """

    def __init__(self):
        self.copies: dict[torch.nn.Module, torch.nn.Linear] = {}

    @contextmanager
    def swapped_in(self, model):
        swapped = []
        try:
            for parent, name, layer in _mergeable_lora_layers(model):
                setattr(parent, name, self._refreshed_copy(layer))
                swapped.append((parent, name, layer))
            yield
        finally:
            for parent, name, layer in swapped:
                setattr(parent, name, layer)

    @torch.no_grad()
    def _refreshed_copy(self, layer) -> torch.nn.Linear:
        base = layer.get_base_layer()
        copy = self.copies.get(layer)
        if copy is None:
            copy = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
            copy.weight = torch.nn.Parameter(torch.empty_like(base.weight), requires_grad=False)
            copy.bias = base.bias  # shared, never written
            self.copies[layer] = copy
        merged = base.weight.to(torch.float32, copy=True)  # never an alias of the base weight, even in fp32
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                merged += layer.get_delta_weight(adapter).float()
        copy.weight.copy_(merged)
        return copy


def _mergeable_lora_layers(model):
    """(parent module, attribute name, LoRA layer) for every LoRA Linear whose active adapters merge exactly."""
    if not hasattr(model, "peft_config"):
        return []
    from peft.tuners.lora import Linear as LoraLinear

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear) or module.merged or module.disable_adapters:
            continue
        if type(module.get_base_layer()) is not torch.nn.Linear or module.fan_in_fan_out:
            continue
        active = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
        if any(module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter) for adapter in active):
            continue
        parent_name, _, attribute = name.rpartition(".")
        found.append((model.get_submodule(parent_name), attribute, module))
    return found
