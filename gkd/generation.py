"""On-policy sampling: completions for a batch of left-padded prompts, stopped and masked at the first stop token.

Always with a KV cache: TRL 1.16's GKDTrainer passes `use_cache=False` whenever gradient checkpointing is on, which
re-runs the whole prefix for every new token.
"""

import torch

from .batching import mask_after_stop


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_token_ids: list[int],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one completion per prompt; returns completion ids [B, C] and a mask that keeps the first stop token."""
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids,
            pad_token_id=pad_token_id,
            use_cache=True,
        )
    finally:
        model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1] :]
    if completion_ids.shape[1] == 0:  # every row stopped at once: keep one masked column
        completion_ids = torch.full_like(prompt_ids[:, :1], pad_token_id)
        return completion_ids, torch.zeros_like(completion_ids)
    completion_mask = mask_after_stop(completion_ids, torch.ones_like(completion_ids), stop_token_ids)
    return completion_ids, completion_mask
