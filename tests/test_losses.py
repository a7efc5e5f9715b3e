"""Tests for gkd.losses, in the Liger-Kernel style: a float64 reference written from the paper's sums, odd shapes,
beta across [0, 1] including the endpoint jump, dtypes, masks, gradcheck, chunked vs full logits, and split invariance.

Tolerances: fp32 against the fp64 reference rtol=1e-5, atol=1e-6 (fp32 log_softmax over <= 127 logits of scale ~2);
fp32 against fp32 (TRL, chunked vs full) rtol=1e-5, atol=1e-6 (only the summation order differs).
"""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gkd.losses import align_vocab, chunked_generalized_jsd, count_tokens, generalized_jsd, masked_sum

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [1.0, 0.7, 2.0]
SHAPES = [(3, 7, 33), (1, 1, 5), (2, 5, 127)]
FP32_VS_FP64 = dict(rtol=1e-5, atol=1e-6)
FP32_VS_FP32 = dict(rtol=1e-5, atol=1e-6)


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
def test_masked_sum_and_count_tokens(mask_dtype):
    per_token = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]]).to(mask_dtype)
    assert masked_sum(per_token, mask).item() == 0.0 + 2.0 + 5.0
    assert count_tokens(mask).item() == 3 and count_tokens(mask).dtype == torch.int64


def test_all_masked_is_exactly_zero_not_nan():
    per_token = generalized_jsd(random_logits((2, 4, 9), 17), random_logits((2, 4, 9), 18), 0.5)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    total = masked_sum(per_token, mask)
    assert total.item() == 0.0 and not torch.isnan(total)
    assert count_tokens(mask).item() == 0


def test_nan_and_inf_at_masked_positions_do_not_leak():
    per_token = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    total = masked_sum(per_token, mask)
    assert total.item() == 3.0
    total.backward()
    torch.testing.assert_close(per_token.grad, mask.float())


# ---------------------------------------------------------------- gradcheck in float64


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_generalized_jsd_student_side(beta):
    student = random_logits((2, 3, 7), 19, dtype=torch.float64).requires_grad_()
    teacher = random_logits((2, 3, 7), 20, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda logits: generalized_jsd(logits, teacher, beta, 0.7), (student,))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_chunked_generalized_jsd(beta):
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


def full_logits_sum(case, beta, temperature):
    linear = torch.nn.functional.linear
    student_logits = linear(case["student_hidden"], case["student_weight"], case.get("student_bias"))
    teacher_logits = linear(case["teacher_hidden"], case["teacher_weight"], case.get("teacher_bias"))
    return generalized_jsd(student_logits, teacher_logits.detach(), beta, temperature).sum()


STUDENT_SIDE = ["student_hidden", "student_weight", "student_bias"]


@pytest.mark.parametrize("vocab_s, vocab_t", [(13, 13), (13, 16), (16, 13)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_matches_full_logits_value_and_gradients(beta, vocab_s, vocab_t):
    n, temperature = 10, 0.7
    reference_case = lm_head_case(n, vocab_s, vocab_t, seed=30, bias=True)
    expected = full_logits_sum(reference_case, beta, temperature)
    expected.backward()
    for chunk_size in [1, 3, n, n + 5]:
        case = lm_head_case(n, vocab_s, vocab_t, seed=30, bias=True)
        ours = chunked_generalized_jsd(beta=beta, temperature=temperature, chunk_size=chunk_size, **case)
        assert ours.dtype == torch.float32 and ours.dim() == 0
        torch.testing.assert_close(ours, expected, **FP32_VS_FP32)
        ours.backward()
        for name in STUDENT_SIDE:
            torch.testing.assert_close(case[name].grad, reference_case[name].grad, **FP32_VS_FP32)
        for name in ["teacher_hidden", "teacher_weight", "teacher_bias"]:
            assert case[name].grad is None, f"{name} received a gradient"


def test_chunked_with_bf16_weights_returns_fp32():
    case = lm_head_case(7, 13, 16, seed=40, dtype=torch.bfloat16)
    ours = chunked_generalized_jsd(beta=0.5, chunk_size=3, **case)
    assert ours.dtype == torch.float32 and ours.item() >= 0
    ours.backward()
    assert case["student_weight"].grad.dtype == torch.bfloat16


def test_chunked_with_no_rows_is_zero_and_backpropagates():
    case = lm_head_case(0, 13, 13, seed=50)
    ours = chunked_generalized_jsd(beta=0.5, **case)
    assert ours.item() == 0.0
    ours.backward()
    assert (case["student_weight"].grad == 0).all()


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
    window_tokens = count_tokens(mask)

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
    means = [masked_sum(per_token[rows], mask[rows]) / count_tokens(mask[rows]).clamp_min(1) for rows in micro_batches]
    assert sum(means).item() / len(means) != pytest.approx(whole.item(), rel=1e-3)


def test_split_invariance_chunked_path():
    student_hidden = random_logits((6, 5, 4), 70, 1.0)
    teacher_hidden = random_logits((6, 5, 3), 71, 1.0)
    teacher_weight = random_logits((13, 3), 72, 1.0)
    _, _, mask, micro_batches = window_case(73)
    window_tokens = count_tokens(mask)

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
    """Records the numel of the largest tensor any operator produces (forward, recomputation and backward alike)."""

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

    hidden=4 < chunk_size keeps the lm_head weight [V, 4] smaller than one chunk's logits, so the largest tensor
    anywhere is exactly one chunk of logits: this proves both that the counter sees the logits and that they are
    never bigger than a chunk, in forward, in backward, and in the backward recomputation.
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

    # Control: the hook does see the [N, V] tensors the plain path saves for backward. Chunking without
    # checkpointing fails too: each chunk's logits would be saved, N x V in total. The checkpointed path saves only
    # its inputs: the hidden states and the [V, H] weights, which are alive anyway.
    _, reference_saved = numel_saved_for_backward(full_logits)
    assert reference_saved >= n * vocab
    loss, chunked_saved = numel_saved_for_backward(chunked)
    assert chunked_saved < n * vocab
    loss.backward()

    with LargestTensor() as largest:
        chunked().backward()
    assert largest.numel == chunk_size * vocab
