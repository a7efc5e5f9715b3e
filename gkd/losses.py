"""The distillation losses, as pure functions: the generalized JSD with a full-logits reference and a chunked fused
path, the same divergence over a teacher's top-K support (the sparse loss), and cross-entropy mixed in.

Every function returns a SUM over token positions, never a mean: the trainer divides by the completion tokens of the
whole gradient-accumulation window on all ranks, so results do not depend on how a batch is split into micro-batches or
ranks. `temperature` is the LOSS temperature (both distributions softened before comparing), not the sampling one.

Unlike TRL 1.16, the divergence runs in at least float32 (TRL's bf16 softmax gave negative divergences), and the
chunked path never holds [tokens, vocab] logits: it projects hidden states a chunk at a time and turns each chunk's
analytic gradient into hidden-state and lm_head gradients during the forward pass (Liger-Kernel's fused linear JSD, in
plain PyTorch). Its design and measurements: docs/performance.md.

A masked vocabulary (`-inf` logits) has no probability there, and a term p_v (log p_v - log q_v) of KL(p || q) counts
only where both log-probabilities are finite: 0 where p_v = 0 (the paper's 0 log 0 = 0; NaN before), and dropped where
p has mass and q has none. The first makes the loss exact wherever the divergence is finite (ids masked on both sides,
every 0 < beta < 1); the second is where the true divergence is +inf (beta = 0 at ids only the student masks, beta = 1
at ids only the teacher masks), and, as torchtune's KD losses mask `isinf(student_logits)`, those ids are left out
rather than make every step non-finite: the student is taught the teacher's distribution over the ids it can emit.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


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


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, from log-probabilities, over the `counted`
    entries only. The others become 0 before any arithmetic: 0 * (-inf - -inf) is NaN, and so is its gradient even
    behind a `torch.where`."""
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    log_p, log_q = torch.where(counted, log_p, zero), torch.where(counted, log_q, zero)
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
    return bucket_jsd(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature), None, beta)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `per_token` where `mask` is true (bool or 0/1); 0.0 when nothing is selected.

    `torch.where` rather than multiplying by the mask: 0 * NaN is NaN, so a NaN or inf at a padded position (for
    example logits of a fully padded row) would otherwise poison the sum and its gradient.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have the same shape")
    return torch.where(mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()


def jsd_and_logit_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float, with_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row `generalized_jsd` of [rows, V] logits and its gradient w.r.t. the student logits, in one pass.

    The fused loss needs both at once: computing the gradient here, analytically, is what lets it drop each chunk's
    logits before the next one (autograd would keep several fp32 [rows, V] intermediates until backward). Same values
    and dtypes as `generalized_jsd` (at least float32); the gradient has that dtype too. Vocab sizes must already match.

    With s = log p_S, t = log p_T, m = log(beta p_T + (1 - beta) p_S), all at temperature tau, and G = dL/ds taken as if
    s were free, the chain rule through log_softmax(z / tau) gives dL/dz = (G - p_S * sum(G)) / tau. Then:
      0 < beta < 1: G = (1 - beta) p_S (s - m + 1) - (1 - beta) p_S (beta p_T + (1 - beta) p_S) / exp(m): the teacher
          term contributes only through m, and the two mixture fractions sum to exactly 1, so G = (1 - beta) p_S g
          with g = s - m, and dL/dz = (1 - beta) / tau * p_S (g - sum(p_S g)).
      beta = 1 (KL(p_S || p_T)): G = p_S (s - t) + p_S; the constant + p_S vanishes through log_softmax, leaving the
          same form with g = s - t and factor 1.
      beta = 0 (KL(p_T || p_S)): G = -p_T, so dL/dz = (p_S - p_T) / tau.
    In each case sum(p_S g) is KL(p_S || m) or KL(p_S || p_T), which the value needs anyway. Logits holding -inf (a
    masked vocabulary) take `_masked_jsd_and_logit_grad`.

    Returns:
        ([rows] divergence, [rows, V] dL/d student_logits, or None when `with_grad` is false).
    """
    student_log_probs, teacher_log_probs = _log_probs(student_logits, temperature), _log_probs(teacher_logits,
                                                                                               temperature)
    if bool(student_log_probs.isneginf().any() or teacher_log_probs.isneginf().any()):
        return _masked_jsd_and_logit_grad(student_log_probs, teacher_log_probs, beta, temperature, with_grad)
    return _jsd_and_logit_grad_from_log_probs_(student_log_probs, teacher_log_probs, beta, temperature, with_grad)


def _jsd_and_logit_grad_from_log_probs_(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float, temperature: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`jsd_and_logit_grad` from the two log_softmax outputs, which it OVERWRITES (the trailing underscore).

    [rows, V] buffers in float32 are all the working memory a chunk needs, so each is reused in place once its value
    has been used: at most 4 are alive at once (the two log-probability buffers included), where the same formulas
    written out of place keep about 9. The gradient is returned in the student's buffer.
    """
    if beta == 0.0:
        teacher_probs = teacher_log_probs.exp()
        log_ratio = teacher_log_probs.sub_(student_log_probs)  # t - s
        logit_grad = student_log_probs.exp_().sub_(teacher_probs).div_(temperature) if with_grad else None
        return teacher_probs.mul_(log_ratio).sum(dim=-1), logit_grad
    student_probs = student_log_probs.exp()
    if beta == 1.0:
        log_ratio = student_log_probs.sub_(teacher_log_probs)  # g = s - t
        student_kl = (student_probs * log_ratio).sum(dim=-1)
        per_row, grad_scale = student_kl, 1.0 / temperature
    else:
        # log m = log(1 - beta) + logaddexp(s, t + log(beta / (1 - beta))): `generalized_jsd`'s
        # logaddexp(s + log(1 - beta), t + log(beta)), rearranged to need no buffer besides m's own.
        mixture_log_probs = teacher_log_probs + (math.log(beta) - math.log1p(-beta))
        torch.logaddexp(student_log_probs, mixture_log_probs, out=mixture_log_probs).add_(math.log1p(-beta))
        log_ratio = student_log_probs.sub_(mixture_log_probs)  # g = s - m
        teacher_log_ratio = torch.sub(teacher_log_probs, mixture_log_probs, out=mixture_log_probs)  # t - m, over m
        teacher_kl = teacher_log_probs.exp_().mul_(teacher_log_ratio).sum(dim=-1)
        del mixture_log_probs, teacher_log_ratio
        student_kl = (student_probs * log_ratio).sum(dim=-1)
        per_row, grad_scale = beta * teacher_kl + (1.0 - beta) * student_kl, (1.0 - beta) / temperature
    if not with_grad:
        return per_row, None
    return per_row, log_ratio.sub_(student_kl.unsqueeze(-1)).mul_(student_probs).mul_(grad_scale)


def _masked_jsd_and_logit_grad(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float,
                               temperature: float, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_jsd_and_logit_grad_from_log_probs_` for log-probabilities holding -inf, with the module docstring's
    convention (`bucket_jsd`'s values, tested). Only a masked vocabulary comes here, so it is written out of place.

    With C the ids where both have mass, 1_C its indicator, and G = dL/ds as in `jsd_and_logit_grad`:
      beta = 0: L = sum_C p_T (t - s), G = -p_T 1_C, so dL/dz = (p_S sum(p_T 1_C) - p_T 1_C) / tau.
      beta = 1: L = sum_C p_S (s - t), G = p_S (g + 1_C) with g = (s - t) 1_C, and dL/dz = (G - p_S sum(G)) / tau:
          the + p_S no longer vanishes where C leaves ids out.
      0 < beta < 1: nothing is dropped (m has mass wherever either has); g = s - m where the student has mass, 0
          elsewhere, and the unmasked formula holds.
    """
    student, teacher = student_log_probs, teacher_log_probs
    student_has, teacher_has = ~student.isneginf(), ~teacher.isneginf()
    zero = torch.zeros((), dtype=student.dtype, device=student.device)
    student_probs = student.exp()
    if beta == 0.0:
        teacher_probs = torch.where(student_has, teacher.exp(), zero)  # p_T 1_C: p_T is 0 where the teacher has none
        log_ratio = torch.where(student_has & teacher_has, teacher - student, zero)
        per_row = (teacher_probs * log_ratio).sum(dim=-1)
        logit_grad = (student_probs * teacher_probs.sum(dim=-1, keepdim=True) - teacher_probs) / temperature
    elif beta == 1.0:
        counted = student_has & teacher_has
        log_ratio = torch.where(counted, student - teacher, zero)
        per_row = (student_probs * log_ratio).sum(dim=-1)
        dl_ds = student_probs * log_ratio + torch.where(counted, student_probs, zero)
        logit_grad = (dl_ds - student_probs * dl_ds.sum(dim=-1, keepdim=True)) / temperature
    else:
        either = student_has | teacher_has
        mixture = torch.logaddexp(torch.where(either, student, zero) + math.log1p(-beta),
                                  torch.where(either, teacher, zero) + math.log(beta))
        log_ratio = torch.where(student_has, student - mixture, zero)
        teacher_kl = torch.where(teacher_has, teacher.exp() * (teacher - mixture), zero).sum(dim=-1)
        student_kl = (student_probs * log_ratio).sum(dim=-1)
        per_row = beta * teacher_kl + (1.0 - beta) * student_kl
        logit_grad = student_probs * (log_ratio - student_kl.unsqueeze(-1)) * ((1.0 - beta) / temperature)
    return per_row, logit_grad if with_grad else None


def _projection_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, weight)` runs in here: autocast's when it is on for the weight's device (it never
    casts float64), otherwise the weight's own, as the model's lm_head would."""
    device_type = weight.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype



# ------------------------------------------------------------------------------------------- the sparse divergence

# The teacher's tail, 1 - sum(top-K), is taken as at least this: fp16 log-probabilities can sum to a little over 1.
TAIL_FLOOR = 1e-7


@dataclass
class DenseTeacher:
    """The teacher as its final hidden states [N, H_t] and lm_head ([V_t, H_t], bias [V_t]): the full distribution."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class SparseTeacher:
    """The teacher as K (id, log-probability) pairs per position, [N, K] each, log-probabilities over the whole
    vocabulary at temperature 1; `valid` [N, K] is false where a slot holds nothing (its id is ignored)."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    valid: torch.Tensor


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x < 0, accurate both near 0 and far below it (Maechler's two branches)."""
    return torch.where(log_x > -math.log(2.0), torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x)))


def sparse_buckets(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, valid: torch.Tensor,
                   tail: bool = True, renormalize: bool = False):
    """Both distributions over the sparse support, as log-probabilities [R, K (+1)], and which buckets count.

    With `tail` (TRL's `loss_add_tail`), one more bucket holds the rest of each distribution: the teacher's
    1 - sum(top-K) against the student's mass outside those ids, so the student is also taught how much mass belongs
    elsewhere. With `renormalize` (NeMo-Aligner's top-K KD), both are renormalised over the K ids instead."""
    neg_inf = torch.tensor(float("-inf"), dtype=student_log_probs.dtype, device=student_log_probs.device)
    student = torch.where(valid, student_log_probs, neg_inf)
    teacher = torch.where(valid, teacher_log_probs.to(student.dtype), neg_inf)
    if renormalize:
        return student.log_softmax(dim=-1), teacher.log_softmax(dim=-1), valid
    if not tail:
        return student, teacher, valid
    ceiling = math.log1p(-TAIL_FLOOR)
    student_tail = _log1mexp(torch.logsumexp(student, dim=-1, keepdim=True).clamp(max=ceiling))
    teacher_tail = _log1mexp(torch.logsumexp(teacher, dim=-1, keepdim=True).clamp(max=ceiling))
    everywhere = torch.ones_like(valid[..., :1])
    return (torch.cat([student, student_tail], -1), torch.cat([teacher, teacher_tail], -1),
            torch.cat([valid, everywhere], -1))


def bucket_jsd(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None, beta: float) -> torch.Tensor:
    """Eq. 1 over the last dimension between two distributions given as log-probabilities (vocabulary ids or sparse
    buckets), empty buckets (not `valid`; None: none empty) and -inf entries holding no mass, TRL's convention at the
    endpoints, and the module docstring's for masked entries."""
    student_has, teacher_has = ~student.isneginf(), ~teacher.isneginf()  # a NaN counts, so it propagates
    if valid is not None:
        student_has, teacher_has = student_has & valid, teacher_has & valid
    if beta == 0.0:
        return _kl(teacher, student, student_has & teacher_has)
    if beta == 1.0:
        return _kl(student, teacher, student_has & teacher_has)
    # log m = logaddexp(log(1 - beta) + log p_S, log(beta) + log p_T): stable, never forms p_S or p_T in the sum.
    # Where neither has mass, m is made finite too: logaddexp's gradient at (-inf, -inf) is NaN.
    either = student_has | teacher_has
    zero = torch.zeros((), dtype=student.dtype, device=student.device)
    mixture = torch.logaddexp(torch.where(either, student, zero) + math.log1p(-beta),
                              torch.where(either, teacher, zero) + math.log(beta))
    return beta * _kl(teacher, mixture, teacher_has) + (1.0 - beta) * _kl(student, mixture, student_has)


def sparse_generalized_jsd(student_logits: torch.Tensor, teacher: SparseTeacher, beta: float,
                           temperature: float = 1.0, tail: bool = True, renormalize: bool = False) -> torch.Tensor:
    """Per-position generalized JSD over the teacher's sparse support: the reference of the sparse loss.

    `student_logits` [N, V]; the student's log-probabilities are over its whole vocabulary (at `temperature`), read
    at the teacher's ids. When the support is the whole vocabulary there is no tail, and this equals
    `generalized_jsd` (tested)."""
    beta, temperature = float(beta), float(temperature)
    _check_beta_temperature(beta, temperature)
    student_log_probs = _log_probs(student_logits, temperature)
    gathered = student_log_probs.gather(-1, torch.where(teacher.valid, teacher.ids, 0))  # empty slots: any id
    tail = tail and teacher.ids.shape[-1] < student_logits.shape[-1]
    student, target, buckets = sparse_buckets(gathered, teacher.log_probs.to(gathered.dtype), teacher.valid, tail,
                                              renormalize)
    return bucket_jsd(student, target, buckets, beta)


def _sparse_jsd_and_logit_grad_(student_log_probs: torch.Tensor, teacher: SparseTeacher, beta: float,
                                temperature: float, with_grad: bool, tail: bool, renormalize: bool):
    """`sparse_generalized_jsd` per row from the student's log_softmax [R, V], which it OVERWRITES, and the gradient
    w.r.t. the student's logits.

    The divergence depends on the logits z only through s_k = z_{id_k} / T - logsumexp(z / T), so with g = dL/ds
    (autograd on the small [R, K] tensors), dL/dz_j = (sum_k g_k [id_k = j] - p_j sum_k g_k) / T."""
    ids = torch.where(teacher.valid, teacher.ids, 0)  # an empty slot's id may be anything, even beyond V
    gathered = student_log_probs.gather(1, ids).detach().requires_grad_(with_grad)
    tail = tail and ids.shape[-1] < student_log_probs.shape[-1]
    with torch.enable_grad():
        student, target, buckets = sparse_buckets(gathered, teacher.log_probs, teacher.valid, tail, renormalize)
        per_row = bucket_jsd(student, target, buckets, beta)
        if not with_grad:
            return per_row.detach(), None
        (bucket_grad,) = torch.autograd.grad(per_row.sum(), gathered)
    logit_grad = student_log_probs.exp_().mul_(-bucket_grad.sum(dim=-1, keepdim=True))
    return per_row.detach(), logit_grad.scatter_add_(1, ids, bucket_grad).div_(temperature)


# ------------------------------------------------------------------------------------ the chunked fused path


@dataclass(frozen=True)
class LossOptions:
    """What the fused loss computes besides its inputs: the divergence, its weight and the SFT term's."""

    beta: float
    temperature: float = 1.0
    chunk_size: int = 512
    kd_weight: float = 1.0
    sft_weight: float = 0.0
    tail: bool = True
    renormalize: bool = False


@dataclass
class LossParts:
    """The weighted total (what is differentiated) and its two sums, for logging."""

    total: torch.Tensor
    kd: torch.Tensor
    sft: torch.Tensor


def _fused_linear_distillation(student_hidden, student_weight, student_bias, teacher, labels, options: LossOptions,
                               needs_grad: tuple[bool, bool, bool]):
    """The loss sums over rows and, for the student tensors flagged in `needs_grad`, the gradients of the total.

    Chunk by chunk: project the student (and a dense teacher), compute each term's value and its gradient w.r.t. the
    chunk's logits in at least float32, turn the weighted sum of those into the chunk's rows of the hidden gradient
    (dlogits @ W) and into an accumulated weight gradient (dlogits.T @ h), and let the chunk's [rows, V] tensors go:
    4 vocabulary matmuls per chunk with a dense teacher, 3 with a sparse one. The dtypes are decided up front and
    autocast is off inside, so each matmul runs exactly where autograd's F.linear would run it: projections in
    `_projection_dtype`, dlogits cast back to it for the two gradient matmuls, weight and bias gradients accumulated
    in at least float32. The cross-entropy is at temperature 1, whatever the loss temperature.

    Returns (total, kd sum, sft sum, grad_hidden, grad_weight, grad_bias), gradients unscaled by grad_output."""
    need_hidden, need_weight, need_bias = needs_grad
    with_grad = any(needs_grad)
    student_dtype = _projection_dtype(student_weight)
    dense = isinstance(teacher, DenseTeacher) and options.kd_weight > 0
    teacher_dtype = _projection_dtype(teacher.weight) if dense else student_dtype
    accumulate_dtype = torch.promote_types(torch.promote_types(student_dtype, teacher_dtype), torch.float32)
    device = student_hidden.device
    with torch.autocast(device.type, enabled=False):
        student_hidden, student_weight = student_hidden.to(student_dtype), student_weight.to(student_dtype)
        student_bias = None if student_bias is None else student_bias.to(student_dtype)
        if dense:
            teacher = DenseTeacher(teacher.hidden.to(teacher_dtype), teacher.weight.to(teacher_dtype),
                                   None if teacher.bias is None else teacher.bias.to(teacher_dtype))
        # Finite hidden states and weights give -inf logits only through a bias that masks ids: the masked formulas run
        # only then, decided once per call, so the usual path pays nothing for them.
        biases = (student_bias, teacher.bias) if dense else ()
        masked = any(bias is not None and bool(bias.isneginf().any()) for bias in biases)
        num_rows, vocab_size = student_hidden.shape[0], student_weight.shape[0]
        grad_hidden = torch.empty(student_hidden.shape, dtype=student_dtype, device=device) if need_hidden else None
        grad_weight = torch.zeros(student_weight.shape, dtype=accumulate_dtype, device=device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=accumulate_dtype, device=device) if need_bias else None
        kd_sum = torch.zeros((), dtype=accumulate_dtype, device=device)
        sft_sum = torch.zeros((), dtype=accumulate_dtype, device=device)
        for start in range(0, num_rows, options.chunk_size):
            rows = slice(start, start + options.chunk_size)
            logits = F.linear(student_hidden[rows], student_weight, student_bias)
            own_temperature = options.sft_weight > 0 and options.temperature != 1.0
            cross_entropy_log_probs = _log_probs(logits, 1.0) if own_temperature else None
            student_log_probs = _log_probs(logits, options.temperature)
            del logits  # freed at once: one [chunk, V] buffer fewer at the peak
            logit_grad = None
            if options.sft_weight > 0:  # before the divergence overwrites student_log_probs
                sft_rows, logit_grad = _cross_entropy_and_logit_grad(
                    student_log_probs if cross_entropy_log_probs is None else cross_entropy_log_probs, labels[rows],
                    with_grad, options.sft_weight)
                sft_sum += sft_rows.sum()
                del cross_entropy_log_probs
            if options.kd_weight > 0:
                kd_rows, kd_grad = _divergence_and_logit_grad_(student_log_probs, teacher, rows, options, with_grad,
                                                               masked)
                kd_sum += kd_rows.sum()
                if kd_grad is not None:
                    kd_grad.mul_(options.kd_weight)
                    logit_grad = kd_grad if logit_grad is None else kd_grad.add_(logit_grad)
                del kd_grad
            del student_log_probs
            if logit_grad is not None:
                if grad_bias is not None:
                    grad_bias += logit_grad.sum(dim=0)
                logit_grad = logit_grad.to(student_dtype)
                if grad_hidden is not None:
                    torch.mm(logit_grad, student_weight, out=grad_hidden[rows])
                if grad_weight is not None and grad_weight.dtype == student_dtype:
                    grad_weight.addmm_(logit_grad.T, student_hidden[rows])
                elif grad_weight is not None:  # a bf16 product per chunk, summed in float32
                    grad_weight += torch.mm(logit_grad.T, student_hidden[rows])
            del logit_grad  # else it lives on through the next chunk's projections: one more [chunk, V] at the peak
    total = options.kd_weight * kd_sum + options.sft_weight * sft_sum
    return total, kd_sum, sft_sum, grad_hidden, grad_weight, grad_bias


def _divergence_and_logit_grad_(student_log_probs, teacher, rows: slice, options: LossOptions, with_grad: bool,
                                masked: bool = False):
    if isinstance(teacher, DenseTeacher):  # the teacher's logits only as a temporary, freed once normalised
        teacher_logits = F.linear(teacher.hidden[rows], teacher.weight, teacher.bias)
        teacher_log_probs = _log_probs(teacher_logits, options.temperature)
        del teacher_logits
        divergence = _masked_jsd_and_logit_grad if masked else _jsd_and_logit_grad_from_log_probs_
        return divergence(student_log_probs, teacher_log_probs, options.beta, options.temperature, with_grad)
    chunk = SparseTeacher(teacher.ids[rows], teacher.log_probs[rows], teacher.valid[rows])
    return _sparse_jsd_and_logit_grad_(student_log_probs, chunk, options.beta, options.temperature, with_grad,
                                       options.tail, options.renormalize)


def _cross_entropy_and_logit_grad(log_probs: torch.Tensor, labels: torch.Tensor, with_grad: bool, weight: float):
    """-log p(label) per row, and weight * (p - onehot(label)), its gradient w.r.t. the logits (a new buffer)."""
    per_row = -log_probs.gather(1, labels[:, None]).squeeze(1)
    if not with_grad:
        return per_row, None
    return per_row, log_probs.exp().scatter_add_(1, labels[:, None], torch.full_like(per_row[:, None], -1.0)).mul_(
        weight)


def _scaled(gradient: torch.Tensor | None, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """gradient * grad_output, written straight into `dtype` (one rounding). Out of place on purpose: a second
    backward through the same graph (retain_graph, gradcheck) would otherwise scale it twice."""
    if gradient is None:
        return None
    return torch.mul(gradient, grad_output, out=torch.empty(gradient.shape, dtype=dtype, device=gradient.device))


class _FusedLinearDistillation(torch.autograd.Function):
    """Autograd wrapper of `_fused_linear_distillation`: gradients are computed in forward, backward scales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher, labels, options):
        total, kd_sum, sft_sum, *gradients = _fused_linear_distillation(
            student_hidden, student_weight, student_bias, teacher, labels, options, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*gradients)
        ctx.input_dtypes = [None if tensor is None else tensor.dtype
                            for tensor in (student_hidden, student_weight, student_bias)]
        ctx.mark_non_differentiable(kd_sum, sft_sum)
        return total, kd_sum, sft_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_sft):
        gradients = [_scaled(g, grad_total, dtype) for g, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)]
        return *gradients, None, None, None  # teacher, labels, options


def chunked_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher: DenseTeacher | SparseTeacher | None, options: LossOptions,
                              labels: torch.Tensor | None = None, student_bias: torch.Tensor | None = None
                              ) -> LossParts:
    """kd_weight * sum of the generalized JSD + sft_weight * sum of the cross-entropy of `labels`, over N rows.

    The memory-lean path: the student's lm_head projection runs `options.chunk_size` rows at a time and each chunk's
    gradient is computed in the forward pass, so at most [chunk_size, V] logits are alive at any time and autograd
    keeps only the [N, H_s] and [V, H_s] gradients. Only the gradients that are needed are computed: with a frozen
    lm_head (LoRA) there is no [V, H_s] matmul, and under `torch.no_grad()` only the values.

    Args:
        student_hidden: [N, H_s] final hidden states at the positions trained on (selected by the caller).
        student_weight, student_bias: the student's lm_head; gradients flow to these and to `student_hidden`.
        teacher: a `DenseTeacher` (the full distribution) or a `SparseTeacher` (K log-probabilities per row);
            treated as constants. None only when `options.kd_weight` is 0.
        labels: [N] the tokens at those positions, for the cross-entropy term (needed when `sft_weight` > 0).

    Vocab sizes may differ (a padded embedding): the weights are sliced to the smaller one, see `align_vocab`.
    Returns float32 sums (float64 for float64 inputs). Not twice differentiable.
    """
    beta, temperature = float(options.beta), float(options.temperature)
    _check_beta_temperature(beta, temperature)
    if options.chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {options.chunk_size}")
    if options.sft_weight > 0 and labels is None:
        raise ValueError("sft_weight > 0 needs labels")
    if options.kd_weight > 0 and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher")
    if student_hidden.dim() != 2:
        raise ValueError(f"expected hidden states [N, H_s], got {tuple(student_hidden.shape)}")
    if isinstance(teacher, DenseTeacher):
        if teacher.hidden.dim() != 2 or teacher.hidden.shape[0] != student_hidden.shape[0]:
            raise ValueError(f"expected teacher hidden states [N, H_t], got {tuple(teacher.hidden.shape)} for "
                             f"{student_hidden.shape[0]} rows")
        # Slice only a padded head: a full-range slice would still make autograd scatter its gradient into a new [V, H].
        vocab_size = min(student_weight.shape[0], teacher.weight.shape[0])
        teacher = DenseTeacher(teacher.hidden.detach(), teacher.weight.detach()[:vocab_size],
                               None if teacher.bias is None else teacher.bias.detach()[:vocab_size])
        if student_weight.shape[0] > vocab_size:
            student_weight = student_weight[:vocab_size]
            student_bias = None if student_bias is None else student_bias[:vocab_size]
    elif isinstance(teacher, SparseTeacher):
        compute_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        teacher = SparseTeacher(teacher.ids, teacher.log_probs.detach().to(compute_dtype), teacher.valid.bool())
    student_side = (student_hidden, student_weight, student_bias)
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in student_side):
        total, kd_sum, sft_sum = _FusedLinearDistillation.apply(*student_side, teacher, labels, options)
    else:  # evaluation, or nothing to differentiate: the values alone (`needs_input_grad` ignores torch.no_grad())
        total, kd_sum, sft_sum, *_ = _fused_linear_distillation(*student_side, teacher, labels, options,
                                                                (False, False, False))
    return LossParts(total, kd_sum, sft_sum)


def chunked_generalized_jsd(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                            teacher_weight: torch.Tensor, beta: float, temperature: float = 1.0, chunk_size: int = 512,
                            student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Sum over rows of `generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)`,
    through the fused path (`chunked_distillation_loss` with a dense teacher and no SFT term)."""
    options = LossOptions(beta=beta, temperature=temperature, chunk_size=chunk_size)
    teacher = DenseTeacher(teacher_hidden, teacher_weight, teacher_bias)
    return chunked_distillation_loss(student_hidden, student_weight, teacher, options, student_bias=student_bias).total


def logits_distillation_loss(student_logits: torch.Tensor, teacher: "torch.Tensor | SparseTeacher | None",
                             options: LossOptions, labels: torch.Tensor, vocab_size: int) -> LossParts:
    """The reference path's sums from full logits at N positions: kd_weight x generalized JSD to `teacher` (its
    logits [N, V_t], or its top-K) + sft_weight x cross-entropy of `labels`. The same sums as
    `chunked_distillation_loss`; `vocab_size` bounds the student's real tokens for the sparse tail."""
    zero = torch.zeros((), device=student_logits.device)
    sft = kd = zero
    if options.sft_weight > 0:
        sft = F.cross_entropy(student_logits.float(), labels, reduction="sum")
    if options.kd_weight > 0 and isinstance(teacher, SparseTeacher):
        kd = sparse_generalized_jsd(student_logits[:, :vocab_size], teacher, options.beta, options.temperature,
                                    renormalize=options.renormalize).sum()
    elif options.kd_weight > 0:
        kd = generalized_jsd(*align_vocab(student_logits, teacher), options.beta, options.temperature).sum()
    return LossParts(options.kd_weight * kd + options.sft_weight * sft, kd.detach(), sft.detach())
