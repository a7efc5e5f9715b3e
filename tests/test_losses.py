"""Tests for gkd.losses, in the Liger-Kernel style: a float64 reference written from the paper's sums, odd shapes,
beta across [0, 1] including the endpoint jump, dtypes, masks, gradcheck, chunked vs full logits, and split invariance.
The chunked loss computes its gradients analytically in forward (`jsd_and_logit_grad`), so its value and gradients are
checked against autograd through the reference, under bf16 weights and bf16 autocast too; dispatch modes count its
matmuls (only the needed ones run) and the tensors it keeps (never more than a few chunks of logits).

Tolerances: fp32 against the fp64 reference rtol=1e-5, atol=1e-6 (fp32 log_softmax over <= 127 logits of scale ~2);
fp32 against fp32 (TRL; the same bf16 logits in both paths) rtol=1e-5, atol=1e-6 (only the summation order differs).
Gradients of the fused chunked path in fp32 against fp64: rtol=1e-5, atol=1e-5. The reverse-KL gradient
p_S (s - t - KL) rounds s - t, an absolute error of ~eps * |log p| per logit (fp32 autograd errs as much: up to 4e-6
here on gradients of size ~5). bf16 gradients against the bf16 autograd path: rtol=atol=2e-2, a few bf16 ulps (2^-8):
the fused path rounds each chunk's weight-gradient product to bf16 and sums in fp32, autograd rounds one product.
"""

import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gkd.losses import (
    DenseTeacher,
    LossOptions,
    SparseTeacher,
    align_vocab,
    chunked_distillation_loss,
    chunked_generalized_jsd,
    generalized_jsd,
    jsd_and_logit_grad,
    masked_sum,
    sparse_generalized_jsd,
)

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [1.0, 0.7, 2.0]
SHAPES = [(3, 7, 33), (1, 1, 5), (2, 5, 127)]
FP32_VS_FP64 = dict(rtol=1e-5, atol=1e-6)
FP32_VS_FP32 = dict(rtol=1e-5, atol=1e-6)
FP32_GRAD_VS_FP64 = dict(rtol=1e-5, atol=1e-5)
BF16_GRAD = dict(rtol=2e-2, atol=2e-2)


def random_logits(shape, seed, scale=2.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def reference_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """Eq. 1 of the GKD paper in float64 with explicit distributions: p teacher, q student, m their mixture."""

    def softmax(logits):
        logits = logits.double() / temperature
        weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        return weights / weights.sum(dim=-1, keepdim=True)

    def kl(a, b):
        return (a * torch.log(a / b)).sum(dim=-1)

    p, q = softmax(teacher_logits), softmax(student_logits)
    if beta == 0:
        return kl(p, q)  # TRL's endpoint convention: forward KL(teacher || student)
    if beta == 1:
        return kl(q, p)  # reverse KL(student || teacher)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


# ---------------------------------------------------------------- generalized_jsd against the fp64 reference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_matches_fp64_reference(shape, beta, temperature):
    student, teacher = random_logits(shape, seed=1), random_logits(shape, seed=2)
    ours = generalized_jsd(student, teacher, beta, temperature)
    assert ours.shape == shape[:-1] and ours.dtype == torch.float32
    expected = reference_jsd(student, teacher, beta, temperature)
    torch.testing.assert_close(ours.double(), expected, **FP32_VS_FP64)


def test_float64_inputs_stay_float64():
    student = random_logits((2, 3, 9), 1, dtype=torch.float64)
    teacher = random_logits((2, 3, 9), 2, dtype=torch.float64)
    ours = generalized_jsd(student, teacher, 0.5)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference_jsd(student, teacher, 0.5), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- agreement with TRL 1.16


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trl_generalized_jsd_loss(beta, temperature):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning
        from trl.experimental.gkd import GKDTrainer

    student, teacher = random_logits((3, 7, 33), seed=3), random_logits((3, 7, 33), seed=4)
    labels = torch.randint(0, 33, (3, 7), generator=torch.Generator().manual_seed(5))
    labels[0, :4] = -100
    labels[2, 5:] = -100
    trl_sum = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=temperature, reduction="sum"
    )
    ours = masked_sum(generalized_jsd(student, teacher, beta, temperature), labels != -100)
    torch.testing.assert_close(ours, trl_sum, **FP32_VS_FP32)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("beta", BETAS)
def test_bf16_inputs_give_fp32_math(beta):
    """TRL computes in the input dtype; bf16 arithmetic gave users negative divergences. We upcast first."""
    student = random_logits((2, 5, 127), seed=6, dtype=torch.bfloat16)
    teacher = random_logits((2, 5, 127), seed=7, dtype=torch.bfloat16)
    ours = generalized_jsd(student, teacher, beta)
    assert ours.dtype == torch.float32
    assert (ours >= 0).all()
    torch.testing.assert_close(ours.double(), reference_jsd(student, teacher, beta), **FP32_VS_FP64)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bf16_near_identical_logits_are_not_negative(beta):
    """Regression for TRL's bf16 arithmetic: on these inputs TRL 1.16 returns about half the positions negative
    (down to -0.01) and errs by ~0.02; computing in fp32 keeps every position within 1e-6 of the fp64 value."""
    generator = torch.Generator().manual_seed(90)
    student = 3 * torch.randn(2, 16, 2048, generator=generator)
    teacher = (student + 0.05 * torch.randn(2, 16, 2048, generator=generator)).bfloat16()
    student = student.bfloat16()
    ours = generalized_jsd(student, teacher, beta)
    assert (ours >= 0).all()
    torch.testing.assert_close(ours.double(), reference_jsd(student, teacher, beta), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_logits_give_zero(beta, dtype):
    logits = random_logits((3, 7, 33), seed=8, dtype=dtype)
    ours = generalized_jsd(logits, logits.clone(), beta, temperature=0.7)
    torch.testing.assert_close(ours, torch.zeros_like(ours), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the endpoint jump (TRL's definition)


def test_small_beta_is_beta_times_forward_kl_and_beta_zero_is_full_kl():
    student, teacher = random_logits((4, 17), 9, 1.0, torch.float64), random_logits((4, 17), 10, 1.0, torch.float64)
    forward_kl = reference_jsd(student, teacher, 0.0)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.0), forward_kl, rtol=1e-10, atol=1e-12)
    near_zero = generalized_jsd(student, teacher, 1e-4)
    # JSD_beta = beta * KL(p_T || p_S) + O(beta^2): the mixture formula vanishes as beta -> 0. The relative O(beta)
    # correction grows with how far apart p_T and p_S are; it is ~5e-4 for these unit-scale logits.
    torch.testing.assert_close(near_zero, 1e-4 * forward_kl, rtol=1e-2, atol=0)
    assert (forward_kl > 1000 * near_zero).all()  # the jump is real: beta=0 is not the limit of beta -> 0


def test_beta_near_one_is_small_and_beta_one_is_full_reverse_kl():
    student, teacher = random_logits((4, 17), 11, 1.0, torch.float64), random_logits((4, 17), 12, 1.0, torch.float64)
    reverse_kl = reference_jsd(student, teacher, 1.0)
    torch.testing.assert_close(generalized_jsd(student, teacher, 1.0), reverse_kl, rtol=1e-10, atol=1e-12)
    near_one = generalized_jsd(student, teacher, 1 - 1e-4)
    torch.testing.assert_close(near_one, 1e-4 * reverse_kl, rtol=1e-2, atol=0)
    assert (reverse_kl > 1000 * near_one).all()


# ---------------------------------------------------------------- vocab alignment and argument checks


def test_padded_teacher_vocab_is_sliced_to_the_shared_vocab():
    student, teacher = random_logits((2, 3, 11), 13), random_logits((2, 3, 16), 14)
    sliced_student, sliced_teacher = align_vocab(student, teacher)
    assert sliced_student.shape == sliced_teacher.shape == (2, 3, 11)
    expected = reference_jsd(student, teacher[..., :11], 0.5).float()
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5), expected)
    expected_swapped = reference_jsd(teacher[..., :11], student, 0.5).float()
    torch.testing.assert_close(generalized_jsd(teacher, student, 0.5), expected_swapped)


def test_bad_arguments_raise():
    logits = random_logits((2, 5), 15)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits, logits, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(logits, logits, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="leading dims"):
        generalized_jsd(logits, random_logits((3, 5), 16), 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_generalized_jsd(logits, logits, logits, logits, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="same shape"):
        masked_sum(logits, torch.ones(5, dtype=torch.bool))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_masked_sum_with_any_mask_dtype(mask_dtype):
    per_token = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]]).to(mask_dtype)
    assert masked_sum(per_token, mask).item() == 0.0 + 2.0 + 5.0


def test_all_masked_is_exactly_zero_not_nan():
    per_token = generalized_jsd(random_logits((2, 4, 9), 17), random_logits((2, 4, 9), 18), 0.5)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    total = masked_sum(per_token, mask)
    assert total.item() == 0.0 and not torch.isnan(total)


def test_nan_and_inf_at_masked_positions_do_not_leak():
    per_token = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    total = masked_sum(per_token, mask)
    assert total.item() == 3.0
    total.backward()
    torch.testing.assert_close(per_token.grad, mask.float())


# ---------------------------------------------------------------- gradcheck in float64


@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck_generalized_jsd_student_side(beta):
    student = random_logits((2, 3, 7), 19, dtype=torch.float64).requires_grad_()
    teacher = random_logits((2, 3, 7), 20, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda logits: generalized_jsd(logits, teacher, beta, 0.7), (student,))


@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck_chunked_generalized_jsd(beta):
    """The fused path's hand-written gradients (hidden, weight, bias) against finite differences, across 3 chunks."""
    n, hidden_s, hidden_t, vocab_s, vocab_t = 5, 4, 3, 9, 11
    student_hidden = random_logits((n, hidden_s), 21, 1.0, torch.float64).requires_grad_()
    student_weight = random_logits((vocab_s, hidden_s), 22, 1.0, torch.float64).requires_grad_()
    student_bias = random_logits((vocab_s,), 23, 1.0, torch.float64).requires_grad_()
    teacher_hidden = random_logits((n, hidden_t), 24, 1.0, torch.float64)
    teacher_weight = random_logits((vocab_t, hidden_t), 25, 1.0, torch.float64)

    def loss(hidden, weight, bias):
        return chunked_generalized_jsd(
            hidden, weight, teacher_hidden, teacher_weight, beta, 1.3, chunk_size=2, student_bias=bias
        )

    assert torch.autograd.gradcheck(loss, (student_hidden, student_weight, student_bias))


# ---------------------------------------------------------------- the analytic gradient w.r.t. the student logits


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS + [1e-4, 1 - 1e-4])
def test_analytic_logit_grad_matches_autograd(beta, temperature):
    """`jsd_and_logit_grad` is what the fused path's gradients rest on: its closed forms against autograd through the
    float64 reference (tight: both are float64), and its fp32 version against that (FP32_VS_FP64). Both sides of the
    endpoint jumps: beta = 0 and 1 have their own formulas, beta = 1e-4 and 1 - 1e-4 use the mixture's."""
    student = random_logits((7, 33), 26, dtype=torch.float64).requires_grad_()
    teacher = random_logits((7, 33), 27, dtype=torch.float64)
    expected = reference_jsd(student, teacher, beta, temperature)
    expected.sum().backward()

    per_row, logit_grad = jsd_and_logit_grad(student.detach(), teacher, beta, temperature)
    torch.testing.assert_close(per_row, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logit_grad, student.grad, rtol=1e-10, atol=1e-14)
    value_only, no_grad = jsd_and_logit_grad(student.detach(), teacher, beta, temperature, with_grad=False)
    assert no_grad is None and torch.equal(value_only, per_row)

    per_row_32, logit_grad_32 = jsd_and_logit_grad(student.detach().float(), teacher.float(), beta, temperature)
    assert per_row_32.dtype == logit_grad_32.dtype == torch.float32
    torch.testing.assert_close(per_row_32.double(), expected.detach(), **FP32_VS_FP64)
    torch.testing.assert_close(logit_grad_32.double(), student.grad, **FP32_VS_FP64)
    per_row_bf16, logit_grad_bf16 = jsd_and_logit_grad(student.detach().bfloat16(), teacher.bfloat16(), beta, 1.0)
    assert per_row_bf16.dtype == logit_grad_bf16.dtype == torch.float32  # bf16 logits, fp32 math


# ---------------------------------------------------------------- chunked path against the full-logits path


def lm_head_case(n, vocab_s, vocab_t, seed, dtype=torch.float32, bias=False):
    """Student and teacher hidden states and lm_heads; the teacher requires grad only to prove it receives none."""
    hidden_s, hidden_t = 6, 5
    tensors = dict(
        student_hidden=random_logits((n, hidden_s), seed, 1.0, dtype),
        student_weight=random_logits((vocab_s, hidden_s), seed + 1, 1.0, dtype),
        teacher_hidden=random_logits((n, hidden_t), seed + 2, 1.0, dtype),
        teacher_weight=random_logits((vocab_t, hidden_t), seed + 3, 1.0, dtype),
    )
    if bias:
        tensors["student_bias"] = random_logits((vocab_s,), seed + 4, 1.0, dtype)
        tensors["teacher_bias"] = random_logits((vocab_t,), seed + 5, 1.0, dtype)
    return {name: tensor.requires_grad_() for name, tensor in tensors.items()}


def copy_case(case, dtype=None):
    """Fresh leaves with the same values (optionally cast), so a reference path gets its own .grad."""
    return {name: tensor.detach().to(dtype or tensor.dtype).requires_grad_() for name, tensor in case.items()}


def full_logits_sum(case, beta, temperature, divergence=generalized_jsd):
    """The plain autograd path: full [N, V] logits from F.linear, then the divergence."""
    linear = torch.nn.functional.linear
    student_logits = linear(case["student_hidden"], case["student_weight"], case.get("student_bias"))
    teacher_logits = linear(case["teacher_hidden"], case["teacher_weight"], case.get("teacher_bias"))
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits.detach())
    return divergence(student_logits, teacher_logits, beta, temperature).sum()


STUDENT_SIDE = ["student_hidden", "student_weight", "student_bias"]
TEACHER_SIDE = ["teacher_hidden", "teacher_weight", "teacher_bias"]


@pytest.mark.parametrize("vocab_s, vocab_t", [(13, 13), (13, 16), (17, 13)])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_matches_fp64_reference_value_and_gradients(beta, temperature, vocab_s, vocab_t):
    """fp32 fused path against the float64 paper-sum reference on full logits, chunk sizes 1, 3, N and > N."""
    n = 11
    case = lm_head_case(n, vocab_s, vocab_t, seed=30, bias=True)
    reference = copy_case(case, torch.float64)
    expected = full_logits_sum(reference, beta, temperature, divergence=reference_jsd)
    expected.backward()
    for chunk_size in [1, 3, n, n + 5]:
        case = copy_case(case)
        ours = chunked_generalized_jsd(beta=beta, temperature=temperature, chunk_size=chunk_size, **case)
        assert ours.dtype == torch.float32 and ours.dim() == 0
        torch.testing.assert_close(ours.double(), expected, **FP32_VS_FP64)
        ours.backward()
        for name in STUDENT_SIDE:
            assert case[name].grad.dtype == torch.float32 and case[name].grad.shape == case[name].shape
            torch.testing.assert_close(case[name].grad.double(), reference[name].grad, **FP32_GRAD_VS_FP64)
        for name in TEACHER_SIDE:
            assert case[name].grad is None, f"{name} received a gradient"


def test_chunked_float64_inputs_stay_float64():
    case = lm_head_case(6, 13, 16, seed=35, dtype=torch.float64, bias=True)
    reference = copy_case(case)
    expected = full_logits_sum(reference, 0.5, 0.7, divergence=reference_jsd)
    expected.backward()
    ours = chunked_generalized_jsd(beta=0.5, temperature=0.7, chunk_size=4, **case)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    ours.backward()
    for name in STUDENT_SIDE:
        torch.testing.assert_close(case[name].grad, reference[name].grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_with_bf16_weights_matches_autograd_path(beta):
    """bf16 lm_heads: bf16 logits as the model's own lm_head, fp32 divergence, bf16 gradients (BF16_GRAD)."""
    case = lm_head_case(9, 13, 16, seed=40, dtype=torch.bfloat16, bias=True)
    reference = copy_case(case)
    expected = full_logits_sum(reference, beta, 0.7)
    expected.backward()
    ours = chunked_generalized_jsd(beta=beta, temperature=0.7, chunk_size=4, **case)
    assert ours.dtype == torch.float32 and ours.item() >= 0
    torch.testing.assert_close(ours, expected, **FP32_VS_FP32)  # the same bf16 logits, the same fp32 math
    ours.backward()
    for name in STUDENT_SIDE:
        assert case[name].grad.dtype == torch.bfloat16
        torch.testing.assert_close(case[name].grad.float(), reference[name].grad.float(), **BF16_GRAD)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_under_bf16_autocast_matches_autograd_path(beta, hidden_dtype):
    """What the trainer does with --bf16 and fp32 weights: the chunked loss inside a bf16 autocast, on hidden states
    that are fp32 or, as a backbone under autocast usually returns them, bf16. Like F.linear there, the projections
    run in bf16 (the fp32 value differs by far more than the tolerance, so this is checked), and each gradient comes
    back in its input's dtype."""
    case = lm_head_case(9, 13, 16, seed=45, bias=True)
    for name in ["student_hidden", "teacher_hidden"]:
        case[name] = case[name].detach().to(hidden_dtype).requires_grad_()
    reference = copy_case(case)
    fp32_value = chunked_generalized_jsd(beta=beta, temperature=0.7, chunk_size=4, **copy_case(case, torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = full_logits_sum(reference, beta, 0.7)
        ours = chunked_generalized_jsd(beta=beta, temperature=0.7, chunk_size=4, **case)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, **FP32_VS_FP32)
    assert abs(fp32_value.item() - expected.item()) > 10 * FP32_VS_FP32["rtol"] * expected.item()
    (expected / 3).backward()  # as the trainer divides by the token count
    (ours / 3).backward()
    for name in STUDENT_SIDE:
        assert case[name].grad.dtype == case[name].dtype
        torch.testing.assert_close(case[name].grad, reference[name].grad, **BF16_GRAD)


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_identical_student_and_teacher_give_zero_and_zero_gradients(beta):
    case = lm_head_case(7, 13, 13, seed=51, bias=True)
    case |= {name.replace("student", "teacher"): case[name].detach() for name in STUDENT_SIDE}
    case |= {name: case[name].detach().clone().requires_grad_() for name in STUDENT_SIDE}
    ours = chunked_generalized_jsd(beta=beta, temperature=0.7, chunk_size=3, **case)
    torch.testing.assert_close(ours, torch.zeros(()), rtol=0, atol=1e-5)
    ours.backward()
    for name in STUDENT_SIDE:
        torch.testing.assert_close(case[name].grad, torch.zeros_like(case[name]), rtol=0, atol=1e-6)


def test_chunked_with_no_rows_is_zero_and_backpropagates():
    case = lm_head_case(0, 13, 13, seed=50, bias=True)
    ours = chunked_generalized_jsd(beta=0.5, **case)
    assert ours.item() == 0.0
    ours.backward()
    assert case["student_hidden"].grad.shape == (0, 6)
    assert (case["student_weight"].grad == 0).all() and (case["student_bias"].grad == 0).all()


def test_chunked_backward_scales_by_grad_output_and_can_run_twice():
    """Backward multiplies the stored gradients out of place: a retained graph gives the same gradients again."""
    case = lm_head_case(7, 13, 13, seed=52, bias=True)
    reference = copy_case(case)
    full_logits_sum(reference, 0.5, 1.0).backward()
    loss = 2.5 * chunked_generalized_jsd(beta=0.5, chunk_size=3, **case)
    loss.backward(retain_graph=True)
    loss.backward()
    for name in STUDENT_SIDE:
        torch.testing.assert_close(case[name].grad, 5.0 * reference[name].grad, **FP32_GRAD_VS_FP64)


def test_tied_embedding_gets_both_gradients():
    """An lm_head tied to the input embedding: the loss's weight gradient adds to the embedding lookup's."""
    generator = torch.Generator().manual_seed(54)
    token_ids = torch.randint(0, 13, (8,), generator=generator)
    teacher_hidden, teacher_weight = random_logits((8, 5), 55, 1.0), random_logits((13, 5), 56, 1.0)
    embedding = random_logits((13, 6), 57, 1.0).requires_grad_()
    reference = embedding.detach().clone().requires_grad_()

    def loss(weight, fused):
        hidden = torch.tanh(weight[token_ids])  # stands in for the transformer between embedding and lm_head
        if fused:
            return chunked_generalized_jsd(hidden, weight, teacher_hidden, teacher_weight, 0.5, chunk_size=3)
        return generalized_jsd(hidden @ weight.T, teacher_hidden @ teacher_weight.T, 0.5).sum()

    loss(embedding, fused=True).backward()
    loss(reference, fused=False).backward()
    torch.testing.assert_close(embedding.grad, reference.grad, **FP32_GRAD_VS_FP64)


# ---------------------------------------------------------------- only the needed work: matmul counts


class MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix multiply (F.linear reaches the dispatcher as mm or addmm; an
    accumulating product as addmm_)."""

    MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.MATMULS:
            self.shapes.append(tuple(out.shape))
        return out


def chunk_rows(n, chunk_size):
    return [min(chunk_size, n - start) for start in range(0, n, chunk_size)]


def test_four_vocabulary_matmuls_per_chunk_all_in_forward():
    """Per chunk: student and teacher logits [rows, V], hidden gradient [rows, H], weight gradient [V, H]; backward
    does no matmul at all (the checkpointed design recomputed both projections there: 6 per chunk)."""
    n, vocab, hidden, chunk_size = 10, 13, 6, 4
    case = lm_head_case(n, vocab, vocab, seed=60, bias=True)
    with MatmulShapes() as forward:
        loss = chunked_generalized_jsd(beta=0.5, chunk_size=chunk_size, **case)
    with MatmulShapes() as backward:
        loss.backward()
    per_chunk = [[(rows, vocab), (rows, vocab), (rows, hidden), (vocab, hidden)] for rows in chunk_rows(n, chunk_size)]
    assert forward.shapes == [shape for shapes in per_chunk for shape in shapes]
    assert backward.shapes == []


def test_frozen_lm_head_skips_the_weight_gradient():
    """LoRA freezes the lm_head: no [V, H] gradient matmul, no weight gradient, the hidden gradient unchanged."""
    n, vocab, hidden, chunk_size = 10, 13, 6, 4
    case = lm_head_case(n, vocab, vocab, seed=62, bias=True)
    case["student_weight"].requires_grad_(False)
    case["student_bias"].requires_grad_(False)
    reference = copy_case(case)
    full_logits_sum(reference, 0.5, 1.0).backward()
    with MatmulShapes() as matmuls:
        chunked_generalized_jsd(beta=0.5, chunk_size=chunk_size, **case).backward()
    assert case["student_weight"].grad is None and case["student_bias"].grad is None
    torch.testing.assert_close(case["student_hidden"].grad, reference["student_hidden"].grad, **FP32_GRAD_VS_FP64)
    expected = [shape for rows in chunk_rows(n, chunk_size) for shape in [(rows, vocab), (rows, vocab), (rows, hidden)]]
    assert matmuls.shapes == expected


def test_no_grad_and_nothing_to_differentiate_compute_the_value_only():
    """Evaluation: two projections per chunk and nothing else, the same value as the training path."""
    n, vocab, chunk_size = 10, 13, 4
    case = lm_head_case(n, vocab, vocab, seed=64)
    training_value = chunked_generalized_jsd(beta=0.5, chunk_size=chunk_size, **case)
    projections_only = [(rows, vocab) for rows in chunk_rows(n, chunk_size) for _ in range(2)]
    with torch.no_grad(), MatmulShapes() as matmuls:
        value = chunked_generalized_jsd(beta=0.5, chunk_size=chunk_size, **case)
    assert not value.requires_grad and torch.equal(value, training_value.detach())
    assert matmuls.shapes == projections_only
    detached = {name: tensor.detach() for name, tensor in case.items()}
    with MatmulShapes() as matmuls:  # grad mode on, but no student tensor requires grad
        value = chunked_generalized_jsd(beta=0.5, chunk_size=chunk_size, **detached)
    assert not value.requires_grad and torch.equal(value, training_value.detach())
    assert matmuls.shapes == projections_only


# ---------------------------------------------------------------- split invariance of the normalisation contract


def window_case(seed):
    """A gradient-accumulation window of 3 micro-batches with different numbers of completion tokens (one has none)."""
    student, teacher = random_logits((6, 5, 11), seed), random_logits((6, 5, 11), seed + 1)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[0, :1] = True  # micro-batch 0: 1 token
    mask[2:4, 1:] = True  # micro-batch 1: 8 tokens
    micro_batches = [slice(0, 2), slice(2, 4), slice(4, 6)]  # micro-batch 2: 0 tokens
    return student, teacher, mask, micro_batches


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_split_invariance_logits_path(beta):
    student, teacher, mask, micro_batches = window_case(60)
    window_tokens = mask.bool().sum()

    whole_student = student.clone().requires_grad_()
    whole = masked_sum(generalized_jsd(whole_student, teacher, beta), mask) / window_tokens
    whole.backward()

    split_student = student.clone().requires_grad_()
    split_total = 0.0
    for rows in micro_batches:  # one backward per micro-batch, as gradient accumulation does
        loss = masked_sum(generalized_jsd(split_student[rows], teacher[rows], beta), mask[rows]) / window_tokens
        loss.backward()
        split_total += loss.item()

    assert split_total == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(split_student.grad, whole_student.grad, **FP32_VS_FP32)
    # Why the contract matters: averaging per-micro-batch means weights tokens unequally.
    per_token = generalized_jsd(student, teacher, beta)
    means = [masked_sum(per_token[rows], mask[rows]) / mask[rows].bool().sum().clamp_min(1) for rows in micro_batches]
    assert sum(means).item() / len(means) != pytest.approx(whole.item(), rel=1e-3)


def test_split_invariance_chunked_path():
    student_hidden = random_logits((6, 5, 4), 70, 1.0)
    teacher_hidden = random_logits((6, 5, 3), 71, 1.0)
    teacher_weight = random_logits((13, 3), 72, 1.0)
    _, _, mask, micro_batches = window_case(73)
    window_tokens = mask.bool().sum()

    def loss(weight, rows):
        student_rows, teacher_rows = student_hidden[rows][mask[rows]], teacher_hidden[rows][mask[rows]]
        total = chunked_generalized_jsd(student_rows, weight, teacher_rows, teacher_weight, 0.5, chunk_size=3)
        return total / window_tokens

    whole_weight = random_logits((11, 4), 74, 1.0).requires_grad_()
    whole = loss(whole_weight, slice(None))
    whole.backward()
    split_weight = whole_weight.detach().clone().requires_grad_()
    split_total = 0.0
    for rows in micro_batches:
        micro = loss(split_weight, rows)
        micro.backward()
        split_total += micro.item()
    assert split_total == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(split_weight.grad, whole_weight.grad, **FP32_VS_FP32)


# ---------------------------------------------------------------- memory: full logits are never materialised


class LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any operator produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def numel_saved_for_backward(compute_loss):
    """Elements autograd keeps alive for backward, counting each storage once (views of one tensor share it)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compute_loss()
    return loss, sum(storages.values())


def test_chunked_never_holds_full_logits():
    """Not a timing test: counts tensor sizes. N=32 rows, V=20000, chunk 8 -> at most [8, V] logits exist.

    hidden=4 < chunk_size keeps the lm_head weight [V, 4] (and its gradient) smaller than one chunk's logits, so the
    largest tensor anywhere is exactly one chunk of logits: this proves both that the counter sees the logits and that
    they are never bigger than a chunk, in forward and in backward.
    """
    n, vocab, hidden, chunk_size = 32, 20_000, 4, 8
    student_hidden = random_logits((n, hidden), 80, 1.0).requires_grad_()
    student_weight = random_logits((vocab, hidden), 81, 0.5).requires_grad_()
    teacher_hidden, teacher_weight = random_logits((n, hidden), 82, 1.0), random_logits((vocab, hidden), 83, 0.5)

    def full_logits():
        return generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, 0.5).sum()

    def chunked():
        return chunked_generalized_jsd(
            student_hidden, student_weight, teacher_hidden, teacher_weight, 0.5, chunk_size=chunk_size
        )

    # Control: the hook does see the [N, V] tensors the plain path saves for backward. Chunking under plain autograd
    # fails too: each chunk's logits and softmax intermediates would be saved, several N x V in total. The fused path
    # saves exactly its two gradients, [N, H] and [V, H], computed in forward.
    _, reference_saved = numel_saved_for_backward(full_logits)
    assert reference_saved >= n * vocab
    loss, chunked_saved = numel_saved_for_backward(chunked)
    assert chunked_saved == n * hidden + vocab * hidden
    loss.backward()

    with LargestTensor() as largest:
        chunked().backward()
    assert largest.numel == chunk_size * vocab


class PeakBytesAlive(TorchDispatchMode):
    """Peak bytes held by tensors that operators create: each new storage counts from the op that makes it until the
    last tensor viewing it is garbage (CPython frees it at once). Views of `inputs` (a detach, a slice) do not count."""

    def __init__(self, *inputs):
        super().__init__()
        self.alive, self.peak = 0, 0
        self.views = {}  # storage pointer -> [number of live tensors viewing it, bytes]
        self.seen = set()  # ids of tensor objects already counted (in-place ops return their input)
        self.inputs = {tensor.untyped_storage().data_ptr() for tensor in inputs}

    def _release(self, pointer, tensor_id):
        self.seen.discard(tensor_id)
        entry = self.views[pointer]
        entry[0] -= 1
        if entry[0] == 0:
            self.alive -= entry[1]
            del self.views[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(tensor, torch.Tensor) or id(tensor) in self.seen:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in self.inputs:
                continue
            if storage.data_ptr() not in self.views:
                self.views[storage.data_ptr()] = [0, storage.nbytes()]
                self.alive += storage.nbytes()
            self.views[storage.data_ptr()][0] += 1
            self.seen.add(id(tensor))
            weakref.finalize(tensor, self._release, storage.data_ptr(), id(tensor))
            self.peak = max(self.peak, self.alive)
        return out


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_working_memory_is_four_chunks_of_logits(beta):
    """Forward and backward together: at most 4 fp32 [chunk, V] buffers besides the [V, H] weight gradient (and the
    [N, H] one). Written with out-of-place formulas, one chunk needs about 9, and forgetting to drop the last chunk's
    gradient before the next chunk's projections makes 5."""
    n, vocab, hidden, chunk_size = 40, 4000, 4, 16
    student_hidden = random_logits((n, hidden), 84, 1.0).requires_grad_()
    student_weight = random_logits((vocab, hidden), 85, 0.5).requires_grad_()
    teacher_hidden, teacher_weight = random_logits((n, hidden), 86, 1.0), random_logits((vocab, hidden), 87, 0.5)
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    with PeakBytesAlive(*inputs) as memory:
        chunked_generalized_jsd(*inputs, beta, 0.7, chunk_size=chunk_size).backward()
    chunk_buffer, gradients = chunk_size * vocab * 4, (vocab + n) * hidden * 4
    assert memory.peak <= 4 * chunk_buffer + gradients + 1024  # 1 KiB: per-row sums and scalars
    assert memory.peak > 3 * chunk_buffer  # the counter does see the chunk's buffers


# ---------------------------------------------------------------- the sparse loss: the teacher's top-K and a tail


def reference_sparse(student_logits, teacher_log_probs_full, ids, beta, temperature=1.0, tail=True, renormalize=False,
                     valid=None):
    """The sparse divergence written out in float64 from its definition: buckets for the support ids (and one for the
    rest of each distribution), or both renormalised over the support; then Eq. 1 over the buckets."""
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    p = torch.exp(teacher_log_probs_full.double())
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    q_k = torch.where(valid, q.gather(-1, ids), 0.0)
    p_k = torch.where(valid, p.gather(-1, ids), 0.0)
    if renormalize:
        q_b, p_b = q_k / q_k.sum(-1, keepdim=True), p_k / p_k.sum(-1, keepdim=True)
    elif tail:
        q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
        p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    else:
        q_b, p_b = q_k, p_k

    def kl(a, b):
        return torch.where(a > 0, a * torch.log(a / b), 0.0).sum(-1)

    if beta == 0:
        return kl(p_b, q_b)
    if beta == 1:
        return kl(q_b, p_b)
    m = beta * p_b + (1 - beta) * q_b
    return beta * kl(p_b, m) + (1 - beta) * kl(q_b, m)


def top_k_teacher(teacher_logits, k, temperature=1.0):
    log_probs = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    top = log_probs.topk(k, dim=-1)
    return SparseTeacher(top.indices, top.values, torch.ones_like(top.indices, dtype=torch.bool)), log_probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", BETAS)
def test_sparse_with_the_whole_vocabulary_is_the_full_loss_value_and_gradient(beta, temperature):
    student = random_logits((6, 23), 90, dtype=torch.float64).requires_grad_()
    teacher_logits = random_logits((6, 23), 91, dtype=torch.float64)
    teacher, _ = top_k_teacher(teacher_logits, 23, temperature)  # K = V: every id, in descending order
    sparse = sparse_generalized_jsd(student, teacher, beta, temperature)
    full = generalized_jsd(student, teacher_logits, beta, temperature)
    torch.testing.assert_close(sparse, full, rtol=1e-12, atol=1e-12)
    (sparse_grad,) = torch.autograd.grad(sparse.sum(), student)
    (full_grad,) = torch.autograd.grad(full.sum(), student)
    torch.testing.assert_close(sparse_grad, full_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("renormalize,tail", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("beta", BETAS)
def test_sparse_matches_its_fp64_definition(beta, renormalize, tail):
    student = random_logits((2, 5, 31), 92)
    teacher, teacher_full = top_k_teacher(random_logits((2, 5, 31), 93), 4)
    ours = sparse_generalized_jsd(student, teacher, beta, tail=tail, renormalize=renormalize)
    expected = reference_sparse(student, teacher_full, teacher.ids, beta, tail=tail, renormalize=renormalize)
    assert ours.shape == (2, 5) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, **FP32_VS_FP64)
    if tail or renormalize:  # both proper distributions over the buckets: a divergence, never below 0
        assert (ours >= -1e-6).all()


def test_sparse_of_a_teacher_that_is_the_student_is_zero():
    student = random_logits((4, 19), 94)
    teacher, _ = top_k_teacher(student, 5)
    for beta in BETAS:
        torch.testing.assert_close(sparse_generalized_jsd(student, teacher, beta), torch.zeros(4), atol=1e-6, rtol=0)


def test_sparse_empty_slots_carry_no_mass_and_no_nan():
    """Fewer than K ids at a position (a server's short answer): empty slots are skipped; an all-empty position
    compares two tails that hold everything, so its divergence is 0."""
    student = random_logits((3, 17), 95, dtype=torch.float64).requires_grad_()
    teacher, teacher_full = top_k_teacher(random_logits((3, 17), 96, dtype=torch.float64), 4)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4])
    ids = teacher.ids.masked_fill(~valid, 0)
    sparse = SparseTeacher(ids, teacher.log_probs.masked_fill(~valid, float("-inf")), valid)
    for beta in BETAS:
        ours = sparse_generalized_jsd(student, sparse, beta)
        expected = reference_sparse(student.detach(), teacher_full, ids, beta, valid=valid)
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-10, atol=1e-12)
        (grad,) = torch.autograd.grad(ours.sum(), student)
        assert torch.isfinite(grad).all() and abs(ours[2].item()) < 1e-12


def test_sparse_tolerates_teacher_log_probs_rounded_to_fp16():
    """fp16 rounding can make the stored top-K sum to a little over 1: the tail is floored, nothing goes NaN."""
    student = random_logits((5, 11), 97)
    logits = torch.zeros(5, 11)
    logits[:, 0] = 30.0  # the teacher is sure: its top-1 holds all but ~1e-12 of the mass
    teacher, _ = top_k_teacher(logits, 3)
    teacher.log_probs = teacher.log_probs.half().float() + 1e-3  # pushed over 1 on purpose
    for beta in BETAS:
        value = sparse_generalized_jsd(student, teacher, beta)
        assert torch.isfinite(value).all() and (value >= -1e-6).all()


def sparse_case(n, vocab, k, seed, dtype=torch.float64):
    hidden = 7
    student_hidden = random_logits((n, hidden), seed, 1.0, dtype).requires_grad_()
    weight = random_logits((vocab, hidden), seed + 1, 1.0, dtype).requires_grad_()
    bias = random_logits((vocab,), seed + 2, 1.0, dtype).requires_grad_()
    teacher, teacher_full = top_k_teacher(random_logits((n, vocab), seed + 3, 2.0, dtype), k)
    return student_hidden, weight, bias, teacher, teacher_full


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_fused_sparse_loss_matches_autograd_through_the_reference(beta, renormalize, chunk_size):
    student_hidden, weight, bias, teacher, teacher_full = sparse_case(11, 29, 5, seed=100)
    options = LossOptions(beta=beta, temperature=1.0, chunk_size=chunk_size, renormalize=renormalize)
    ours = chunked_distillation_loss(student_hidden, weight, teacher, options, student_bias=bias).total
    ours.backward()
    gradients = [tensor.grad.clone() for tensor in (student_hidden, weight, bias)]
    for tensor in (student_hidden, weight, bias):
        tensor.grad = None
    logits = student_hidden @ weight.T + bias
    expected = reference_sparse(logits, teacher_full, teacher.ids, beta, renormalize=renormalize).sum()
    expected.backward()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    for ours_grad, tensor in zip(gradients, (student_hidden, weight, bias)):
        torch.testing.assert_close(ours_grad, tensor.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_fused_sparse_loss(beta):
    student_hidden, weight, bias, teacher, _ = sparse_case(5, 13, 3, seed=110)
    options = LossOptions(beta=beta, chunk_size=2)

    def loss(hidden, head, head_bias):
        return chunked_distillation_loss(hidden, head, teacher, options, student_bias=head_bias).total

    assert torch.autograd.gradcheck(loss, (student_hidden, weight, bias))


def test_sparse_path_holds_no_full_logits():
    """With a sparse teacher a chunk needs one fewer vocabulary buffer than with a dense one (no teacher logits)."""
    n, vocab, hidden, chunk_size = 40, 4000, 4, 16
    student_hidden = random_logits((n, hidden), 120, 1.0).requires_grad_()
    weight = random_logits((vocab, hidden), 121, 0.5).requires_grad_()
    teacher, _ = top_k_teacher(random_logits((n, vocab), 122), 20)
    teacher = SparseTeacher(teacher.ids, teacher.log_probs.float(), teacher.valid)
    with PeakBytesAlive(student_hidden, weight, teacher.ids, teacher.log_probs, teacher.valid) as memory:
        chunked_distillation_loss(student_hidden, weight, teacher, LossOptions(beta=0.5, chunk_size=chunk_size)
                                  ).total.backward()
    chunk_buffer, gradients = chunk_size * vocab * 4, (vocab + n) * hidden * 4
    assert 2 * chunk_buffer < memory.peak <= 3 * chunk_buffer + gradients + 4096


# ---------------------------------------------------------------- KD and SFT mixed in one pass


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kd_weight,sft_weight", [(1.0, 0.4), (0.0, 1.0), (0.3, 0.7)])
def test_kd_plus_sft_matches_the_weighted_reference(kd_weight, sft_weight, temperature):
    """NeMo-Aligner's kd_loss_weight * KD + sft_loss_weight * CE, the CE always at temperature 1."""
    case = lm_head_case(9, 17, 17, seed=130, dtype=torch.float64, bias=True)
    labels = torch.randint(0, 17, (9,), generator=torch.Generator().manual_seed(131))
    teacher = DenseTeacher(case["teacher_hidden"], case["teacher_weight"], case["teacher_bias"])
    options = LossOptions(beta=0.5, temperature=temperature, chunk_size=4, kd_weight=kd_weight, sft_weight=sft_weight)
    parts = chunked_distillation_loss(case["student_hidden"], case["student_weight"], teacher, options, labels=labels,
                                      student_bias=case["student_bias"])
    parts.total.backward()
    student = (case["student_hidden"], case["student_weight"], case["student_bias"])
    gradients = [tensor.grad.clone() for tensor in student]
    for tensor in student:
        tensor.grad = None
    logits = case["student_hidden"] @ case["student_weight"].T + case["student_bias"]
    teacher_logits = case["teacher_hidden"] @ case["teacher_weight"].T + case["teacher_bias"]
    kd = reference_jsd(logits, teacher_logits, 0.5, temperature).sum()
    sft = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    (kd_weight * kd + sft_weight * sft).backward()
    # A term of weight 0 is not computed at all (the teacher is not even projected): its sum reads 0.
    torch.testing.assert_close(parts.kd, kd.detach() if kd_weight else torch.zeros((), dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts.sft, sft.detach(), rtol=1e-10, atol=1e-12)
    for ours, tensor in zip(gradients, student):
        torch.testing.assert_close(ours, tensor.grad, rtol=1e-9, atol=1e-11)
    assert not parts.kd.requires_grad and not parts.sft.requires_grad  # logged, not differentiated


def test_sft_only_needs_no_teacher():
    case = lm_head_case(5, 11, 11, seed=140, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4, 5])
    options = LossOptions(beta=0.5, kd_weight=0.0, sft_weight=1.0, chunk_size=2)
    parts = chunked_distillation_loss(case["student_hidden"], case["student_weight"], None, options, labels=labels)
    logits = case["student_hidden"] @ case["student_weight"].T
    torch.testing.assert_close(parts.total, torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    with pytest.raises(ValueError, match="needs labels"):
        chunked_distillation_loss(case["student_hidden"], case["student_weight"], None,
                                  LossOptions(beta=0.5, sft_weight=1.0))


# ---------------------------------------------------------------- -inf logits: a masked vocabulary

MASKED = [0, 3, 7]  # ids masked with -inf (in both, or in one only)


def reference_dropping(student_logits, teacher_logits, beta, temperature=1.0):
    """Eq. 1 in float64 from the paper's sums, each KL term p_v log(p_v / q_v) taken where both p_v and q_v are
    positive: 0 log 0 = 0, and the ids where p has mass and q has none (the divergence's +inf) left out."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)

    def kl(a, b):
        keep = (a > 0) & (b > 0)
        a, b = torch.where(keep, a, 1.0), torch.where(keep, b, 1.0)  # no 0/0, even in the gradient
        return torch.where(keep, a * torch.log(a / b), 0.0).sum(-1)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def masked_logits(shape, seed, ids, dtype=torch.float64):
    logits = random_logits(shape, seed, dtype=dtype)
    logits[..., ids] = float("-inf")
    return logits


def kept_columns(vocab, masked):
    return [v for v in range(vocab) if v not in masked]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", BETAS)
def test_a_vocabulary_masked_in_both_is_the_divergence_over_the_rest(beta, temperature):
    """-inf at the same ids in teacher and student (was NaN at every beta): value and gradient equal the float64
    reference on the logits with those ids dropped; the masked ids get a zero gradient. Reference path (autograd),
    analytic gradient (fp64 and fp32), and the sparse reference."""
    vocab = 13
    student = masked_logits((4, vocab), 120, MASKED).requires_grad_()
    teacher = masked_logits((4, vocab), 121, MASKED)
    kept = kept_columns(vocab, MASKED)
    dropped_student = student.detach()[:, kept].clone().requires_grad_()
    expected = reference_jsd(dropped_student, teacher[:, kept], beta, temperature)
    (expected_grad_kept,) = torch.autograd.grad(expected.sum(), dropped_student)
    expected_grad = torch.zeros(4, vocab, dtype=torch.float64)
    expected_grad[:, kept] = expected_grad_kept

    ours = generalized_jsd(student, teacher, beta, temperature)
    (grad,) = torch.autograd.grad(ours.sum(), student)
    torch.testing.assert_close(ours.detach(), expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)

    per_row, logit_grad = jsd_and_logit_grad(student.detach(), teacher, beta, temperature)
    torch.testing.assert_close(per_row, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logit_grad, expected_grad, rtol=1e-10, atol=1e-14)
    per_row_32, logit_grad_32 = jsd_and_logit_grad(student.detach().float(), teacher.float(), beta, temperature)
    torch.testing.assert_close(per_row_32.double(), expected.detach(), **FP32_VS_FP64)
    torch.testing.assert_close(logit_grad_32.double(), expected_grad, **FP32_VS_FP64)

    sparse_teacher, _ = top_k_teacher(teacher, len(kept), temperature)  # the teacher's support: the kept ids
    sparse = sparse_generalized_jsd(student, sparse_teacher, beta, temperature)
    (sparse_grad,) = torch.autograd.grad(sparse.sum(), student)
    torch.testing.assert_close(sparse.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse_grad, expected_grad, rtol=1e-9, atol=1e-12)

    same = generalized_jsd(student.detach(), student.detach(), beta, temperature)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-15)  # identical: 0, not NaN


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("masked_side", ["student", "teacher"])
def test_ids_masked_on_one_side_follow_the_documented_convention(beta, masked_side):
    """-inf at ids where the other side has mass: finite value and gradient, equal to the reference that leaves out
    only the ids of an infinite term (beta = 0 with the student masked, beta = 1 with the teacher masked); every other
    beta is the exact divergence (checked against the plain reference where it is finite)."""
    vocab = 11
    masked = masked_logits((5, vocab), 122, MASKED)
    other = random_logits((5, vocab), 123, dtype=torch.float64)
    student, teacher = (masked, other) if masked_side == "student" else (other, masked)
    student = student.clone().requires_grad_()
    expected = reference_dropping(student, teacher, beta)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student)
    infinite = (beta == 0 and masked_side == "student") or (beta == 1 and masked_side == "teacher")
    if not infinite:  # nothing left out: the paper's value
        def nearly_masked(logits):  # e^-50 instead of 0: the plain reference's sums stay finite
            return torch.where(torch.isinf(logits), -50.0, logits)

        exact = reference_jsd(nearly_masked(student), nearly_masked(teacher), beta)
        torch.testing.assert_close(expected.detach(), exact.detach(), rtol=1e-10, atol=1e-12)

    ours = generalized_jsd(student, teacher, beta)
    (grad,) = torch.autograd.grad(ours.sum(), student)
    assert torch.isfinite(ours).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(ours.detach(), expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    per_row, logit_grad = jsd_and_logit_grad(student.detach(), teacher, beta, 1.0)
    torch.testing.assert_close(per_row, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logit_grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert torch.isfinite(jsd_and_logit_grad(student.detach().float(), teacher.float(), beta, 1.0)[1]).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("masked_side", ["both", "student", "teacher"])
def test_chunked_with_biases_that_mask_ids_matches_the_dropping_reference(beta, masked_side):
    """The fused path with -inf in the lm_head biases (how a masked vocabulary reaches it): value, and the hidden,
    weight and bias gradients against autograd through the float64 reference, in fp64 and fp32, across chunks."""
    n, vocab = 7, 13
    case = lm_head_case(n, vocab, vocab, seed=124, bias=True)
    for side in (["student", "teacher"] if masked_side == "both" else [masked_side]):
        with torch.no_grad():
            case[f"{side}_bias"][MASKED] = float("-inf")
    reference = copy_case(case, torch.float64)
    expected = full_logits_sum(reference, beta, 1.0, divergence=reference_dropping)
    expected.backward()
    for dtype, tolerance in ((torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, FP32_GRAD_VS_FP64)):
        for chunk_size in [3, n]:
            ours_case = copy_case(case, dtype)
            ours = chunked_generalized_jsd(beta=beta, chunk_size=chunk_size, **ours_case)
            ours.backward()
            assert torch.isfinite(ours)
            torch.testing.assert_close(ours.double(), expected, **tolerance)
            for name in STUDENT_SIDE:
                assert torch.isfinite(ours_case[name].grad).all()
                torch.testing.assert_close(ours_case[name].grad.double(), reference[name].grad, **tolerance)


@pytest.mark.parametrize("beta", BETAS)
def test_fused_sparse_loss_with_masked_ids_is_finite_and_matches_the_reference(beta):
    """The sparse path: the student's bias masks ids, two of them in the teacher's top-K, and the teacher gives one
    valid slot -inf (a zero probability): value and gradients against autograd through the sparse reference."""
    student_hidden, weight, bias, teacher, _ = sparse_case(6, 19, 5, seed=130)
    with torch.no_grad():
        bias[teacher.ids[:, :2].flatten()] = float("-inf")
    log_probs = teacher.log_probs.clone()
    log_probs[:, -1] = float("-inf")
    teacher = SparseTeacher(teacher.ids, log_probs, teacher.valid)
    options = LossOptions(beta=beta, chunk_size=4)
    ours = chunked_distillation_loss(student_hidden, weight, teacher, options, student_bias=bias).total
    ours.backward()
    gradients = [tensor.grad.clone() for tensor in (student_hidden, weight, bias)]
    for tensor in (student_hidden, weight, bias):
        tensor.grad = None
    expected = sparse_generalized_jsd(student_hidden @ weight.T + bias, teacher, beta).sum()
    expected.backward()
    assert torch.isfinite(ours) and all(torch.isfinite(grad).all() for grad in gradients)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    for ours_grad, tensor in zip(gradients, (student_hidden, weight, bias)):
        torch.testing.assert_close(ours_grad, tensor.grad, rtol=1e-9, atol=1e-11)
