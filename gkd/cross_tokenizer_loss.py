"""The loss against a teacher with another tokenizer (`--cross_tokenizer`), as a pure function of the student's logits
and the aligned teacher (`AlignedTeacher`, built by `gkd.teachers.cross`).

A completion is cut into chunks that cover the same bytes on both sides (`gkd.teachers.alignment`):
- at a 1:1 chunk both sides predict one token from the same text, so their next-token distributions are compared: the
  sparse generalized JSD (`--beta`) over the teacher's top-K (`--teacher_top_k`; the full vocabulary when unset), the
  student's side summed per teacher token over its group (`VocabularyPair.student_group`), teacher ids with no student
  token going to the tail bucket;
- on an m:n chunk only the sampled text can be compared: the sampled-chunk estimator of the reverse KL (tinker's and
  DPCA's signal), log p_S(chunk) - log p_T(chunk), differentiated as REINFORCE would, so its gradient is
  (log p_S - log p_T) * grad log p_S(chunk). Its value is the estimate itself; `--beta` does not apply there.

Like `gkd.losses`, a SUM over the trained positions (1:1 positions, and each m:n chunk once); the trainer divides by
the window's completion tokens.
"""

from dataclasses import dataclass

import torch

from .losses import SparseTeacher, _check_beta_temperature, _log_probs, bucket_jsd, sparse_buckets


@dataclass
class AlignedTeacher:
    """The teacher at N student completion positions (row-major over the completion mask).

    `sparse`: the teacher's top-K in ITS vocabulary at each position, valid only where the position starts a 1:1
    chunk (`one_to_one` [N]); `student_group` [V_s]: the teacher id each student id is counted under (-1: none);
    `teacher_vocab_size`; `chunk_of` [N]: the m:n chunk a position belongs to (-1: none) and
    `chunk_teacher_log_probs` [C] the teacher's log-probability of each such chunk's tokens;
    `teacher_log_probs` [N]: the teacher's log-probability of the 1:1 token at each 1:1 position (for the logged
    estimate)."""

    sparse: SparseTeacher
    student_group: torch.Tensor
    teacher_vocab_size: int
    one_to_one: torch.Tensor
    chunk_of: torch.Tensor
    chunk_teacher_log_probs: torch.Tensor
    teacher_log_probs: torch.Tensor


def group_log_probs(student_log_probs: torch.Tensor, student_group: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_vocab_size: int) -> torch.Tensor:
    """log of the student's probability summed over each teacher id's group, [R, K] from [R, V_s]; -inf where the
    group is empty. With identical tokenizers every group is one token and this is a gather."""
    vocab = student_log_probs.shape[-1]
    groups = student_group[:vocab].to(student_log_probs.device)
    if groups.shape[0] < vocab:  # a padded embedding's rows are no token: in no group
        groups = torch.cat([groups, groups.new_full((vocab - groups.shape[0],), -1)])
    groups = torch.where(groups >= 0, groups, teacher_vocab_size)  # no group: a column that is dropped
    shift = student_log_probs.max(dim=-1, keepdim=True).values.detach()
    masses = student_log_probs.new_zeros(student_log_probs.shape[0], teacher_vocab_size + 1)
    masses = masses.scatter_add(1, groups.expand_as(student_log_probs), (student_log_probs - shift).exp())
    return masses.gather(1, teacher_ids.clamp(min=0, max=teacher_vocab_size)).log() + shift


def aligned_distillation(student_logits: torch.Tensor, labels: torch.Tensor, teacher: AlignedTeacher, beta: float,
                         temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(kd sum, estimates) from the student's logits [N, V_s] at the aligned positions and their tokens `labels` [N].

    The estimates, summed over the positions given: `chunk_reverse_kl` (log p_S - log p_T of every chunk, 1:1 and
    m:n, at the loss temperature: a sampled estimate of the sequence-level reverse KL), and `one_to_one` (1:1 positions)."""
    beta, temperature = float(beta), float(temperature)
    _check_beta_temperature(beta, temperature)
    # Zero, but part of the graph: a micro-batch with nothing to compare still backpropagates (a zero gradient).
    total = torch.nan_to_num(student_logits, posinf=0.0, neginf=0.0).sum().float() * 0.0
    token_log_probs = _log_probs(student_logits, temperature).gather(1, labels[:, None]).squeeze(1)
    estimate = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    rows = teacher.one_to_one.nonzero().squeeze(1)
    if rows.numel():
        student_log_probs = _log_probs(student_logits[rows], temperature)
        ids, valid = teacher.sparse.ids[rows], teacher.sparse.valid[rows]
        grouped = group_log_probs(student_log_probs, teacher.student_group, torch.where(valid, ids, 0),
                                  teacher.teacher_vocab_size)
        valid = valid & torch.isfinite(grouped)  # a teacher token no student token can write: in the tail
        student, target, buckets = sparse_buckets(grouped, teacher.sparse.log_probs[rows].to(grouped.dtype), valid)
        total = total + bucket_jsd(student, target, buckets, beta).sum()
        estimate = estimate + (token_log_probs[rows] - teacher.teacher_log_probs[rows]).detach().float().sum()
    members = teacher.chunk_of >= 0
    if bool(members.any()):
        chunks = teacher.chunk_teacher_log_probs.to(token_log_probs.device).float()
        student_chunks = token_log_probs.new_zeros(chunks.shape[0], dtype=torch.float32)
        student_chunks = student_chunks.index_add(0, teacher.chunk_of[members], token_log_probs[members].float())
        seen = torch.zeros_like(chunks, dtype=torch.bool).index_fill(0, teacher.chunk_of[members], True)
        difference = (student_chunks - chunks).detach()
        # value: the estimate itself; gradient: (log p_S - log p_T) grad log p_S, the REINFORCE form of reverse KL
        surrogate = difference + difference * (student_chunks - student_chunks.detach())
        total = total + surrogate[seen].sum()
        estimate = estimate + difference[seen].sum()
    return total, {"chunk_reverse_kl": estimate, "one_to_one": teacher.one_to_one.sum().float()}
