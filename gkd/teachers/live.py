"""The teacher as a model beside the student: its hidden states feed the dense loss, or its top-K the sparse one."""

import torch
import torch.nn.functional as F

from ..losses import DenseTeacher, SparseTeacher, _log_probs
from . import SparseTargets


def last_hidden_state(model, input_ids, attention_mask):
    """The backbone's output, without running lm_head (PEFT-wrapped or not)."""
    if hasattr(model, "peft_config"):
        model = model.base_model.model
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


@torch.no_grad()
def top_k_targets(hidden: torch.Tensor, head: torch.nn.Linear, k: int, temperature: float, vocab_size: int,
                  labels: torch.Tensor, chunk_size: int) -> SparseTargets:
    """The live teacher's K most likely tokens at each row of `hidden` [N, H], a chunk of rows at a time (never
    [N, V] at once), with the log-probability of each row's own token (`labels`). Ids of a padded embedding's rows
    (at or beyond `vocab_size`) are invalid, as a server's would be."""
    ids, log_probs, actual = [], [], []
    for start in range(0, hidden.shape[0], max(chunk_size, 1)):
        rows = slice(start, start + max(chunk_size, 1))
        chunk = _log_probs(F.linear(hidden[rows], head.weight, head.bias), temperature)
        top = chunk.topk(k, dim=-1)
        ids.append(top.indices)
        log_probs.append(top.values.float())
        actual.append(chunk.gather(1, labels[rows, None]).squeeze(1).float())
    ids, log_probs = torch.cat(ids), torch.cat(log_probs)
    return SparseTargets(ids, log_probs, ids < vocab_size, torch.cat(actual))


def dense(hidden: torch.Tensor, head: torch.nn.Linear) -> DenseTeacher:
    return DenseTeacher(hidden, head.weight, head.bias)


def sparse_teacher(targets: SparseTargets, top_k: int | None, beta: float, labels: torch.Tensor) -> SparseTeacher:
    """What the sparse loss compares against: the first `top_k` slots, or, for K = 1 with beta = 1 (reverse KL), the
    completion's own token (tinker's and TRL's server mode: the student's sample, where reverse KL puts its weight)."""
    if top_k == 1 and beta == 1.0:
        targets = targets.sampled_token(labels)
    elif top_k is not None:
        targets = targets.top(top_k)
    return SparseTeacher(targets.ids, targets.log_probs, targets.valid)
