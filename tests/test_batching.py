"""gkd/batching.py: the one batch layout, and plain-text windows turned into prompts for on-policy steps."""

import torch

from gkd.batching import left_pad_prompts, mask_after_stop, pad_batch, text_prompts

PAD, STOP = 0, 2


def test_pad_batch_lays_out_prompts_left_and_completions_right_and_carries_the_index():
    batch = pad_batch([{"prompt_ids": [5, 6], "completion_ids": [7, STOP], "index": 3, "is_text": False},
                       {"prompt_ids": [8], "completion_ids": [], "index": 9, "is_text": True}], PAD)
    assert batch["prompt_ids"].tolist() == [[5, 6], [PAD, 8]] and batch["prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["completion_ids"].tolist() == [[7, STOP], [PAD, PAD]]
    assert batch["completion_mask"].tolist() == [[1, 1], [0, 0]]  # from lengths: pad == stop would hide the stop
    assert batch["index"].tolist() == [3, 9] and batch["is_text"].tolist() == [False, True]


def test_text_windows_become_prompts_of_their_first_tokens_and_chat_rows_keep_theirs():
    batch = pad_batch([{"prompt_ids": [11], "completion_ids": [12, 13, 14, 15], "is_text": True},
                       {"prompt_ids": [5, 6, 7], "completion_ids": [8, STOP], "is_text": False}], PAD)
    prompted = text_prompts(batch, 3, PAD)
    assert prompted["prompt_ids"].tolist() == [[11, 12, 13], [5, 6, 7]]
    assert prompted["prompt_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    short = text_prompts(pad_batch([{"prompt_ids": [11], "completion_ids": [12], "is_text": True}], PAD), 5, PAD)
    assert short["prompt_ids"].tolist() == [[11, 12]]  # a window shorter than N: all of it is the prompt
    chat_only = pad_batch([{"prompt_ids": [5], "completion_ids": [6]}], PAD)
    assert text_prompts(chat_only, 3, PAD) is chat_only


def test_prompts_of_several_micro_batches_stack_left_padded():
    first = pad_batch([{"prompt_ids": [5, 6, 7], "completion_ids": [8]}], PAD)
    second = pad_batch([{"prompt_ids": [9], "completion_ids": [10]}], PAD)
    ids, mask = left_pad_prompts([first, second], PAD)
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_mask_keeps_the_first_stop_and_nothing_after_it():
    ids = torch.tensor([[4, STOP, 5, STOP], [4, 5, 6, 7]])
    assert mask_after_stop(ids, torch.ones_like(ids), [STOP]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
