"""Completions for a batch of left-padded prompts, stopped and masked at the first stop token.

Always with a KV cache: TRL 1.16's GKDTrainer passes `use_cache=False` whenever gradient checkpointing is on, which
re-runs the whole prefix for every new token.
"""

import torch

from .batching import mask_after_stop


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
    temperature: float | None,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One completion per prompt, sampled at `temperature` (None = greedy).

    Returns completion ids [B, C] and a mask that keeps each row's first stop token and nothing after it."""
    sampling = {"do_sample": False} if temperature is None else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0
    }
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids,
            pad_token_id=pad_token_id,
            use_cache=True,
            **sampling,
        )
    finally:
        model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1] :]
    if completion_ids.shape[1] == 0:  # nothing generated: keep one masked column so shapes stay valid
        completion_ids = torch.full_like(prompt_ids[:, :1], pad_token_id)
        return completion_ids, torch.zeros_like(completion_ids)
    completion_mask = mask_after_stop(completion_ids, torch.ones_like(completion_ids), stop_token_ids)
    return completion_ids, completion_mask
