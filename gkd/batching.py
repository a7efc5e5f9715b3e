"""Pad encoded samples into the one batch layout every step uses: [left-padded prompt | right-padded completion].

Prompts end at the same column for every row, so a batch of prompts feeds `generate` as is, and completion token t
of every row sits at column `prompt_width + t`: the loss reads logits at fixed columns, no per-row gathers.
Masks come from lengths, never from token ids: pad and EOS are often the same token (<|im_end|>), and an id-based
mask would hide the final EOS, so the student would never learn to stop.
"""

import torch

ROW_KEYS = ("index", "is_text", "teacher_index")  # per-row values a batch carries besides its ids and masks
# A teacher with its own tokenizer (--cross_tokenizer): each row's prompt in the teacher's tokens, left-padded.
TEACHER_PROMPT_KEYS = ("teacher_prompt_ids", "teacher_prompt_mask")


def pad_batch(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Collate {"prompt_ids", "completion_ids"} lists into prompt_ids/prompt_mask/completion_ids/completion_mask (and
    `index`, `is_text`, `teacher_index` when the samples have them)."""
    prompt_ids, prompt_mask = left_pad([sample["prompt_ids"] for sample in samples], pad_token_id)
    # At least one completion column, so a batch of prompt-only records still has a well-formed (all-masked) target.
    completion_width = max(1, max(len(sample["completion_ids"]) for sample in samples))
    batch_size = len(samples)
    completion_ids = torch.full((batch_size, completion_width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((batch_size, completion_width), dtype=torch.long)
    for row, sample in enumerate(samples):
        completion = sample["completion_ids"]
        if completion:
            completion_ids[row, : len(completion)] = torch.tensor(completion)
            completion_mask[row, : len(completion)] = 1
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    # A sample's row (its key in a teacher cache); plain text or chat; which of several teachers teaches it.
    for key in ROW_KEYS:
        if key in samples[0]:
            batch[key] = torch.tensor([sample[key] for sample in samples])
    if "teacher_prompt_ids" in samples[0]:
        batch.update(zip(TEACHER_PROMPT_KEYS, left_pad([sample["teacher_prompt_ids"] for sample in samples], 0)))
    return batch


def left_pad(rows: list, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids (lists or 1-D tensors) as one left-padded [B, W] tensor, W the longest row, and its mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if len(row):
            ids[index, width - len(row):] = torch.as_tensor(row)
            mask[index, width - len(row):] = 1
    return ids, mask


def mask_after_stop(completion_ids: torch.Tensor, valid: torch.Tensor, stop_token_ids: list[int]) -> torch.Tensor:
    """1 up to and including each row's first stop token (within `valid`), 0 after it."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_token_ids, device=completion_ids.device)) & valid.bool()
    # Count stops strictly before each position: a position is kept while no stop came before it.
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (valid.bool() & (stops_before == 0)).long()


def left_pad_prompts(batches: list[dict], pad_token_id: int,
                     keys: tuple[str, str] = ("prompt_ids", "prompt_mask")) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the prompts of several micro-batches (different widths) into one left-padded batch (`keys`: the
    student's prompts, or a cross-tokenizer teacher's, TEACHER_PROMPT_KEYS)."""
    ids_key, mask_key = keys
    width = max(batch[ids_key].shape[1] for batch in batches)
    ids, masks = [], []
    for batch in batches:
        missing = width - batch[ids_key].shape[1]
        ids.append(torch.nn.functional.pad(batch[ids_key], (missing, 0), value=pad_token_id))
        masks.append(torch.nn.functional.pad(batch[mask_key], (missing, 0), value=0))
    return torch.cat(ids), torch.cat(masks)


def text_prompts(batch: dict, prompt_tokens: int, pad_token_id: int) -> dict:
    """On-policy steps on plain text: the first `prompt_tokens` tokens of each text window become its prompt (the
    student continues them); chat rows keep theirs. Returns the batch with new prompt_ids and prompt_mask."""
    if "is_text" not in batch or not bool(batch["is_text"].any()):
        return batch
    prompts = []
    for row in range(batch["prompt_ids"].shape[0]):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        if bool(batch["is_text"][row]):
            window = torch.cat([prompt, batch["completion_ids"][row][batch["completion_mask"][row].bool()]])
            prompt = window[:prompt_tokens]
        prompts.append(prompt)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    return {**batch, "prompt_ids": prompt_ids.to(batch["prompt_ids"].device),
            "prompt_mask": prompt_mask.to(batch["prompt_mask"].device)}
