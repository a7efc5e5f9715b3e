"""What every teacher source hands the sparse loss: its K most likely tokens per completion position
(`SparseTargets`), computed from logits in one place (`top_k_of_logits`) whichever source holds the model."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import SparseTeacher, _log_probs


@dataclass
class SparseTargets:
    """The teacher at N completion positions (row-major over the batch's completion mask): ids [N, K] and their
    log-probabilities [N, K] (float32), `valid` [N, K] false where a slot holds nothing, and the log-probability of
    the completion's own token at each position [N] (the support of `--teacher_top_k 1 --beta 1`)."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    valid: torch.Tensor
    actual_log_probs: torch.Tensor

    BATCH_KEYS = ("teacher_ids", "teacher_log_probs", "teacher_valid", "teacher_actual_log_probs")

    def into_batch(self, batch: dict) -> dict:
        """The targets as batch tensors, so they travel with the micro-batch (and to its device) like its ids."""
        values = (self.ids, self.log_probs, self.valid, self.actual_log_probs)
        return {**batch, **dict(zip(self.BATCH_KEYS, values))}

    @classmethod
    def from_batch(cls, batch: dict) -> "SparseTargets | None":
        if "teacher_ids" not in batch:
            return None
        return cls(*(batch[key] for key in cls.BATCH_KEYS))

    def for_loss(self, top_k: int, beta: float, labels: torch.Tensor) -> SparseTeacher:
        """What the sparse loss compares against: the first `top_k` slots (the K stored are in descending order), or,
        for K = 1 with beta = 1 (reverse KL), the completion's own token (tinker's and TRL's server mode: the
        student's sample, where reverse KL puts its weight)."""
        if top_k == 1 and beta == 1.0:
            log_probs = self.actual_log_probs.reshape(-1, 1)
            return SparseTeacher(labels.reshape(-1, 1), log_probs, torch.isfinite(log_probs))
        return SparseTeacher(self.ids[:, :top_k], self.log_probs[:, :top_k], self.valid[:, :top_k])


def top_k_of_logits(logits: torch.Tensor, k: int, temperature: float, vocab_size: int,
                    labels: torch.Tensor) -> SparseTargets:
    """The K most likely tokens of each row of `logits` [N, V] at the loss temperature, with the log-probability of
    each row's own token (`labels` [N]). Ids of a padded embedding's rows (at or beyond `vocab_size`) are invalid, as
    a server's would be."""
    log_probs = _log_probs(logits, temperature)
    top = log_probs.topk(k, dim=-1)
    actual = log_probs.gather(1, labels[:, None]).squeeze(1)
    return SparseTargets(top.indices, top.values.float(), top.indices < vocab_size, actual.float())


@torch.no_grad()
def top_k_targets(hidden: torch.Tensor, head: torch.nn.Linear, k: int, temperature: float, vocab_size: int,
                  labels: torch.Tensor, chunk_size: int) -> SparseTargets:
    """`top_k_of_logits` of `hidden` [N, H] projected by `head`, a chunk of rows at a time (never [N, V] at once)."""
    step = max(chunk_size, 1)
    chunks = [top_k_of_logits(F.linear(hidden[start:start + step], head.weight, head.bias), k, temperature,
                              vocab_size, labels[start:start + step]) for start in range(0, hidden.shape[0], step)]
    if not chunks:
        empty = hidden.new_zeros(0, k)
        return SparseTargets(empty.long(), empty.float(), empty.bool(), hidden.new_zeros(0).float())
    return SparseTargets(*(torch.cat([getattr(chunk, name) for chunk in chunks])
                           for name in ("ids", "log_probs", "valid", "actual_log_probs")))


def completion_rows(batch: dict) -> list[tuple[list[int], list[int]]]:
    """Each row's prompt and completion token ids without padding (the layout of `batching.pad_batch`)."""
    rows = []
    for prompt, prompt_mask, completion, completion_mask in zip(
        batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    ):
        rows.append((prompt[prompt_mask.bool()].tolist(), completion[completion_mask.bool()].tolist()))
    return rows
