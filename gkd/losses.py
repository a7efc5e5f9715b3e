"""Generalized Jensen-Shannon divergence for GKD, as pure functions: a full-logits reference and a chunked path.

Normalisation contract: every function here returns a SUM over token positions, never a mean. The trainer divides
by the number of completion tokens in the whole gradient-accumulation window (`count_tokens` over the window), so
the loss and its gradients do not depend on how a batch is split into micro-batches or across ranks. A per-micro-batch
mean would weight a token by 1 / (tokens in its micro-batch) instead.

`temperature` here is the LOSS temperature (both distributions are softened by it before comparing them). It is a
separate setting from the SAMPLING temperature used to generate on-policy completions; the two can differ.

Where we diverge from TRL 1.16 (`GKDTrainer.generalized_jsd_loss`): TRL computes softmax and the divergence in the
input dtype, so bf16 logits give bf16 arithmetic and users saw negative divergences; we always compute in at least
float32. TRL also materialises full [batch, seq, vocab] logits; `chunked_generalized_jsd` never holds more than
[chunk_size, vocab] at a time, in forward or backward.
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice both logits to the smaller last dimension.

    Models often pad their embedding beyond the tokenizer (to a multiple of 64 or 128 for fast matmuls), so a student
    and a teacher sharing one tokenizer can report different vocab sizes. Ids beyond the shared tokenizer are never
    real tokens: no text encodes to them, so dropping them only removes probability mass that carries no meaning.
    Whether the two tokenizers really are the same is checked once, when the models are loaded (`models.py`).
    """
    vocab_size = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) in at least float32: bf16/fp16 are upcast, float64 stays float64."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _check_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position generalized JSD (GKD paper, Agarwal et al. 2024, Eq. 1), with TRL's convention at the endpoints.

    With p_T = softmax(teacher / temperature) and p_S = softmax(student / temperature):
        m = beta * p_T + (1 - beta) * p_S
        JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)
    The mixture formula tends to 0 at both endpoints, so, like TRL, beta = 0 is defined as the forward
    KL(p_T || p_S) and beta = 1 as the reverse KL(p_S || p_T). This makes the loss jump at the endpoints: for small
    beta, JSD_beta is about beta * KL(p_T || p_S) (beta = 1e-4 gives ~1e-4 x KL) while beta = 0 gives the full KL;
    symmetrically near 1. We keep TRL's definition so configs mean the same thing in both.

    Args:
        student_logits, teacher_logits: [..., V] with the same leading dims, any float dtype. Vocab sizes may differ
            (a padded embedding); both are sliced to the smaller one, see `align_vocab`.
        beta: in [0, 1]; weight of the teacher in the mixture.
        temperature: the LOSS temperature dividing both logits (as TRL does), not the sampling temperature.

    Returns:
        [...] divergence per position, computed and returned in float32 (float64 inputs stay float64). No reduction:
        use `masked_sum` and divide by the window's token count in the trainer.
    """
    beta, temperature = float(beta), float(temperature)
    _check_beta_temperature(beta, temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student and teacher logits must share leading dims, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
    student_log_probs = _log_probs(student_logits, temperature)
    teacher_log_probs = _log_probs(teacher_logits, temperature)
    if beta == 0.0:
        return _kl(teacher_log_probs, student_log_probs)
    if beta == 1.0:
        return _kl(student_log_probs, teacher_log_probs)
    # log m = logaddexp(log(1 - beta) + log p_S, log(beta) + log p_T): stable, never forms p_S or p_T in the sum.
    mixture_log_probs = torch.logaddexp(student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta))
    return beta * _kl(teacher_log_probs, mixture_log_probs) + (1.0 - beta) * _kl(student_log_probs, mixture_log_probs)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `per_token` where `mask` is true (bool or 0/1); 0.0 when nothing is selected.

    `torch.where` rather than multiplying by the mask: 0 * NaN is NaN, so a NaN or inf at a padded position (for
    example logits of a fully padded row) would otherwise poison the sum and its gradient.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have the same shape")
    return torch.where(mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()


def count_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Number of true entries (int64 tensor): the caller sums it over the whole accumulation window as normaliser."""
    return mask.bool().sum()


def _chunk_jsd_sum(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Divergence summed over one chunk of rows; the only place [chunk, V] logits exist."""
    student_logits = F.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return generalized_jsd(student_logits, teacher_logits, beta, temperature).sum()


def chunked_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over rows of `generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)`.

    The memory-lean path: full [N, V] logits (N completion tokens x a 150k vocab, in fp32) dominate GKD's memory.
    Here the lm_head projection is done `chunk_size` rows at a time and each chunk runs under a non-reentrant
    activation checkpoint, so forward keeps only the chunk's inputs and backward recomputes one chunk's logits at a
    time: at most [chunk_size, V] logits are alive. The cost is recomputing each chunk's student and teacher
    projections in backward (teacher logits passed in from outside would have to be kept for every chunk).

    Args:
        student_hidden: [N, H_s] final hidden states at the completion positions already selected by the caller.
        student_weight, student_bias: the student's lm_head, [V_s, H_s] and [V_s]. Gradients flow to these and to
            `student_hidden`.
        teacher_hidden, teacher_weight, teacher_bias: [N, H_t], [V_t, H_t], [V_t]. Treated as constants (detached).
        beta, temperature: as in `generalized_jsd`; temperature is the LOSS temperature, not the sampling one.
        chunk_size: rows projected at once; need not divide N.

    The projection runs in the weights' dtype (as the model's own lm_head would); the divergence is computed in
    float32. Vocab sizes may differ (a padded embedding): the weights are sliced to the smaller one, see
    `align_vocab`.

    Returns:
        float32 scalar: the SUM over the N rows. The trainer divides by the token count of the whole
        gradient-accumulation window.
    """
    beta, temperature = float(beta), float(temperature)
    _check_beta_temperature(beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"expected hidden states [N, H_s] and [N, H_t], got {tuple(student_hidden.shape)} "
            f"and {tuple(teacher_hidden.shape)}"
        )
    vocab_size = min(student_weight.shape[0], teacher_weight.shape[0])
    student_weight = student_weight[:vocab_size]
    student_bias = None if student_bias is None else student_bias[:vocab_size]
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()[:vocab_size]
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()[:vocab_size]

    # Empty slices sum to exactly 0 and keep the graph connected, so N == 0 still backpropagates (zero gradients).
    compute_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    total = (student_hidden[:0].sum() + student_weight[:0].sum()).to(compute_dtype)
    num_rows = student_hidden.shape[0]
    for start in range(0, num_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = (student_hidden[rows], student_weight, student_bias, teacher_hidden[rows], teacher_weight, teacher_bias)
        if num_rows <= chunk_size:
            # One chunk covers every row: its backward follows forward at once, so keeping its logits costs no more
            # peak memory than recomputing them, and saves two vocabulary projections.
            total = total + _chunk_jsd_sum(*chunk, beta, temperature)
        else:
            total = total + checkpoint(
                _chunk_jsd_sum, *chunk, beta, temperature,
                use_reentrant=False,
                preserve_rng_state=False,  # no randomness inside a chunk
            )
    return total
