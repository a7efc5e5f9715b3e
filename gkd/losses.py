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
[chunk_size, vocab] at a time: it projects hidden states a chunk at a time and turns each chunk's analytic gradient
into hidden-state and lm_head gradients during the forward pass (as Liger-Kernel's fused linear JSD does, in plain
PyTorch), so no [chunk_size, vocab] tensor outlives its chunk and backward only scales the stored gradients.
"""

import math

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
    In each case sum(p_S g) is KL(p_S || m) or KL(p_S || p_T), which the value needs anyway.

    Returns:
        ([rows] divergence, [rows, V] dL/d student_logits, or None when `with_grad` is false).
    """
    return _jsd_and_logit_grad_from_log_probs_(
        _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature), beta, temperature, with_grad
    )


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


def _projection_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, weight)` runs in here: autocast's when it is on for the weight's device (it never
    casts float64), otherwise the weight's own, as the model's lm_head would."""
    device_type = weight.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _fused_linear_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    beta: float,
    temperature: float,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The divergence summed over rows and, for the student tensors flagged in `needs_grad`, its gradients.

    Chunk by chunk: project (4 matmuls per chunk with every gradient: student and teacher logits, then
    dlogits @ W into the chunk's rows of the hidden gradient and dlogits.T @ h into an accumulated weight gradient),
    and let the chunk's [rows, V] tensors go. The dtypes are decided once, up front, and autocast is switched off
    inside so that each matmul runs exactly where stated: projections in `_projection_dtype` (bf16 under a bf16
    autocast, as autograd's F.linear would), the divergence and dlogits in at least float32, dlogits cast back to the
    projection dtype for the two gradient matmuls (as autograd's linear backward would), and the weight and bias
    gradients accumulated across chunks in at least float32.

    Returns:
        (scalar sum, grad_hidden [N, H_s] in the projection dtype, grad_weight [V, H_s] and grad_bias [V] in the
        accumulation dtype), each gradient None unless flagged. All unscaled: the caller multiplies by grad_output.
    """
    need_hidden, need_weight, need_bias = needs_grad
    student_dtype, teacher_dtype = _projection_dtype(student_weight), _projection_dtype(teacher_weight)
    accumulate_dtype = torch.promote_types(torch.promote_types(student_dtype, teacher_dtype), torch.float32)
    device = student_hidden.device
    with torch.autocast(device.type, enabled=False):
        student_hidden, student_weight = student_hidden.to(student_dtype), student_weight.to(student_dtype)
        student_bias = None if student_bias is None else student_bias.to(student_dtype)
        teacher_hidden, teacher_weight = teacher_hidden.to(teacher_dtype), teacher_weight.to(teacher_dtype)
        teacher_bias = None if teacher_bias is None else teacher_bias.to(teacher_dtype)

        num_rows, vocab_size = student_hidden.shape[0], student_weight.shape[0]
        grad_hidden = torch.empty(student_hidden.shape, dtype=student_dtype, device=device) if need_hidden else None
        grad_weight = torch.zeros(student_weight.shape, dtype=accumulate_dtype, device=device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=accumulate_dtype, device=device) if need_bias else None
        total = torch.zeros((), dtype=accumulate_dtype, device=device)
        for start in range(0, num_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            # Logits only as temporaries: each is freed as soon as its log-probabilities exist.
            per_row, logit_grad = _jsd_and_logit_grad_from_log_probs_(
                _log_probs(F.linear(student_hidden[rows], student_weight, student_bias), temperature),
                _log_probs(F.linear(teacher_hidden[rows], teacher_weight, teacher_bias), temperature),
                beta,
                temperature,
                with_grad=any(needs_grad),
            )
            total += per_row.sum()
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
    return total, grad_hidden, grad_weight, grad_bias


def _scaled(gradient: torch.Tensor | None, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """gradient * grad_output, written straight into `dtype` (one rounding, no intermediate copy in the wider dtype).

    Out of place on purpose: scaling the stored gradient in place would save a [V, H] buffer, but a second backward
    through the same graph (retain_graph, gradcheck's reentrancy check) would then scale it twice."""
    if gradient is None:
        return None
    return torch.mul(gradient, grad_output, out=torch.empty(gradient.shape, dtype=dtype, device=gradient.device))


class _FusedLinearJSD(torch.autograd.Function):
    """Autograd wrapper around `_fused_linear_jsd`: gradients are computed in forward, backward only scales them."""

    @staticmethod
    def forward(ctx, *inputs):
        """`inputs` are `_fused_linear_jsd`'s arguments up to `chunk_size`; the first three are the student's."""
        total, *gradients = _fused_linear_jsd(*inputs, needs_grad=tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*gradients)
        ctx.input_dtypes = [None if tensor is None else tensor.dtype for tensor in inputs[:3]]
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        gradients = [_scaled(g, grad_output, dtype) for g, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)]
        return *gradients, None, None, None, None, None, None  # teacher tensors, beta, temperature, chunk_size


def chunked_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 512,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over rows of `generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)`.

    The memory-lean path: full [N, V] logits (N completion tokens x a 150k vocab, in fp32) dominate GKD's memory.
    Here the lm_head projection is done `chunk_size` rows at a time, and each chunk's gradient is computed in the
    forward pass itself (analytically, `jsd_and_logit_grad`) and immediately turned into gradients for the hidden
    states, weight and bias (Liger-Kernel's fused linear JSD, in plain PyTorch). So at most [chunk_size, V] logits are
    alive at any time, autograd saves only the [N, H_s] and [V, H_s] gradients, and each chunk costs 4 vocabulary
    matmuls (student and teacher projections, two gradient matmuls) where recomputing in backward would cost 6.
    Only the gradients that are needed are computed: with a frozen lm_head (LoRA) there is no [V, H_s] matmul, and
    under `torch.no_grad()` (evaluation) or with nothing requiring grad, only the value.

    Args:
        student_hidden: [N, H_s] final hidden states at the completion positions already selected by the caller.
        student_weight, student_bias: the student's lm_head, [V_s, H_s] and [V_s]. Gradients flow to these and to
            `student_hidden` (a tied embedding just accumulates the lm_head part).
        teacher_hidden, teacher_weight, teacher_bias: [N, H_t], [V_t, H_t], [V_t]. Treated as constants (detached).
        beta, temperature: as in `generalized_jsd`; temperature is the LOSS temperature, not the sampling one.
        chunk_size: rows projected at once; need not divide N.

    The projection runs in the weights' dtype (as the model's own lm_head would), or in autocast's dtype when autocast
    is on, as F.linear would; the divergence and its gradient are computed in at least float32. Gradients come back in
    each input's dtype. Vocab sizes may differ (a padded embedding): the weights are sliced to the smaller one, see
    `align_vocab`.

    Returns:
        float32 scalar (float64 for float64 inputs): the SUM over the N rows. The trainer divides by the token count of
        the whole gradient-accumulation window. Not twice differentiable.
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
    # Slice only a padded head: a full-range slice would still make autograd scatter its gradient into a new [V, H].
    vocab_size = min(student_weight.shape[0], teacher_weight.shape[0])
    if student_weight.shape[0] > vocab_size:
        student_weight = student_weight[:vocab_size]
        student_bias = None if student_bias is None else student_bias[:vocab_size]
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()[:vocab_size]
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()[:vocab_size]

    student_side = (student_hidden, student_weight, student_bias)
    teacher_side = (teacher_hidden, teacher_weight, teacher_bias)
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in student_side):
        return _FusedLinearJSD.apply(*student_side, *teacher_side, beta, temperature, chunk_size)
    # Evaluation, or nothing to differentiate: the value alone. (Inside `Function.forward`, `needs_input_grad` reflects
    # only `requires_grad`, not `torch.no_grad()`, so this decision is made here.)
    total, *_ = _fused_linear_jsd(*student_side, *teacher_side, beta, temperature, chunk_size, (False, False, False))
    return total
