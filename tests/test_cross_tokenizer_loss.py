"""The cross-tokenizer loss (gkd/cross_tokenizer_loss.py) against a float64 reference written out term by term; the
same loss and gradient as the normal path when both sides share a tokenizer; and a packed number never pushed down
where the teacher writes its digits one by one."""

import math

import pytest
import torch
from test_teachers import loaded, positions_of, window  # noqa: F401 (fixtures: loaded builds window)

from gkd import losses, models
from gkd.cross_tokenizer_loss import AlignedTeacher, aligned_distillation
from gkd.losses import SparseTeacher
from gkd.teachers.alignment import VocabularyPair
from gkd.teachers.cross import CrossTokenizerTeacher
from gkd.teachers.live import LiveTeacher

TAIL_FLOOR = 1e-7


def _jsd(student: list, teacher: list, beta: float):
    """Generalized JSD between two lists of probabilities (float64 tensors), written out; at the endpoints TRL's
    limits: beta 0 is KL(teacher || student), beta 1 is KL(student || teacher)."""
    total = 0.0
    if beta in (0.0, 1.0):
        p, q = (teacher, student) if beta == 0.0 else (student, teacher)
        return sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(p, q) if a > 0)
    for q, r in zip(student, teacher):
        m = beta * r + (1 - beta) * q
        if beta > 0 and r > 0:
            total = total + beta * r * (torch.log(r) - torch.log(m))
        if beta < 1 and q > 0:
            total = total + (1 - beta) * q * (torch.log(q) - torch.log(m))
    return total


def reference(logits: torch.Tensor, labels: torch.Tensor, teacher: AlignedTeacher, beta: float, temperature: float):
    """The loss position by position and chunk by chunk; its chunk term as the REINFORCE estimator it stands for:
    sum over m:n chunks of stop_grad(log p_S - log p_T) * log p_S, plus the estimate's value."""
    logits = logits.double()
    total, value_offset = 0.0, 0.0
    groups = teacher.student_group.tolist()
    for n in range(logits.shape[0]):
        if not teacher.one_to_one[n]:
            continue
        probs = torch.softmax(logits[n] / temperature, dim=-1)
        student, target = [], []
        for k in range(teacher.sparse.ids.shape[1]):
            if not teacher.sparse.valid[n, k]:
                continue
            members = [s for s, group in enumerate(groups[:logits.shape[1]]) if group == int(teacher.sparse.ids[n, k])]
            if not members:
                continue  # no student token writes it: its mass is in the tail
            student.append(sum(probs[s] for s in members))
            target.append(torch.tensor(math.exp(float(teacher.sparse.log_probs[n, k])), dtype=torch.float64))
        student.append(torch.clamp(1 - sum(student), min=TAIL_FLOOR))
        target.append(torch.clamp(1 - sum(target), min=TAIL_FLOOR))
        total = total + _jsd(student, target, beta)
    token = torch.log_softmax(logits / temperature, dim=-1).gather(1, labels[:, None]).squeeze(1)
    for chunk in sorted(set(teacher.chunk_of.tolist()) - {-1}):
        student_chunk = token[teacher.chunk_of == chunk].sum()
        difference = (student_chunk - teacher.chunk_teacher_log_probs[chunk].double()).detach()
        total = total + difference * student_chunk
        value_offset += float(difference) - float(difference * student_chunk.detach())
    return total, value_offset


def random_target(seed: int, positions=9, student_vocab=14, teacher_vocab=11, k=4) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    groups = torch.randint(-1, teacher_vocab, (student_vocab,), generator=generator)
    groups[:3] = torch.tensor([0, 0, 0])  # one group of three student tokens
    ids = torch.stack([torch.randperm(teacher_vocab, generator=generator)[:k] for _ in range(positions)])
    teacher_probs = torch.rand(positions, k, generator=generator, dtype=torch.float64)
    teacher_probs = 0.9 * teacher_probs / teacher_probs.sum(dim=1, keepdim=True)  # a tail of 0.1
    valid = torch.rand(positions, k, generator=generator) > 0.15
    one_to_one = torch.tensor([True, True, False, False, True, False, True, True, False])[:positions]
    chunk_of = torch.tensor([-1, -1, 0, 0, -1, 1, -1, -1, 1])[:positions]
    chunk_log_probs = torch.tensor([-3.0, -1.5])
    teacher_log_probs = -torch.rand(positions, generator=generator)
    target = AlignedTeacher(SparseTeacher(ids, teacher_probs.log().float(), valid), groups, teacher_vocab, one_to_one,
                            chunk_of, chunk_log_probs, teacher_log_probs)
    logits = torch.randn(positions, student_vocab, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, student_vocab, (positions,), generator=generator)
    return logits, labels, target


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_the_float64_reference(beta, temperature, seed):
    logits, labels, target = random_target(seed)
    ours_logits = logits.clone().requires_grad_(True)
    ours, _ = aligned_distillation(ours_logits, labels, target, beta, temperature)
    ours.backward()
    reference_logits = logits.clone().requires_grad_(True)
    expected, value_offset = reference(reference_logits, labels, target, beta, temperature)
    expected.backward()
    torch.testing.assert_close(ours.double(), expected.detach() + value_offset, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-6)


def test_the_estimate_is_log_p_student_minus_log_p_teacher_over_every_chunk():
    logits, labels, target = random_target(2)
    _, estimates = aligned_distillation(logits, labels, target, 0.5)
    token = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    one_to_one = (token - target.teacher_log_probs.double())[target.one_to_one].sum()
    chunks = sum(token[target.chunk_of == c].sum() - target.chunk_teacher_log_probs[c] for c in (0, 1))
    assert float(estimates["chunk_reverse_kl"]) == pytest.approx(float(one_to_one + chunks), rel=1e-5)
    assert float(estimates["one_to_one"]) == 5


def test_a_micro_batch_with_nothing_to_compare_still_backpropagates():
    """Every completion left out (none the teacher could be given): a zero loss with a zero gradient, not an error."""
    logits, labels, target = random_target(3)
    nothing = AlignedTeacher(target.sparse, target.student_group, target.teacher_vocab_size,
                             torch.zeros_like(target.one_to_one), torch.full_like(target.chunk_of, -1),
                             target.chunk_teacher_log_probs, target.teacher_log_probs)
    logits = logits.clone().requires_grad_(True)
    loss, estimates = aligned_distillation(logits, labels, nothing, 0.5)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(estimates["chunk_reverse_kl"]) == 0.0
    assert bool((logits.grad == 0).all())


# ---- the number test: X-Token's failure of GOLD's exact map, in miniature ----

STUDENT_TOKENS = ["1", "123", "x", "y"]  # the student packs "123"
TEACHER_TOKENS = ["1", "2", "3", "x", "y"]  # the teacher writes it "1" "2" "3"


def _number_position(groups: list[int]) -> tuple[torch.Tensor, AlignedTeacher]:
    """One 1:1 position before a number: the teacher puts 0.9 on "1" (the number's first digit)."""
    ids = torch.tensor([[0, 3, 4]])
    probs = torch.tensor([[0.9, 0.05, 0.05]])
    target = AlignedTeacher(SparseTeacher(ids, probs.log(), torch.ones_like(ids, dtype=torch.bool)),
                            torch.tensor(groups), len(TEACHER_TOKENS), torch.tensor([True]),
                            torch.tensor([-1]), torch.zeros(0), torch.zeros(1))
    return torch.zeros(1, len(STUDENT_TOKENS), requires_grad=True), target


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_packed_number_is_not_pushed_down_when_the_teacher_writes_its_digits(beta):
    logits, target = _number_position([0, 0, 3, 4])  # "123" counted under the teacher's "1"
    loss, _ = aligned_distillation(logits, torch.tensor([0]), target, beta)
    loss.backward()
    packed = STUDENT_TOKENS.index("123")
    assert logits.grad[0, packed] < 0  # gradient descent raises it, with "1"
    assert logits.grad[0, packed] == pytest.approx(float(logits.grad[0, 0]))

    # GOLD's exact map counts "123" under no teacher token: then the same step pushes it down. The test above
    # would fail on that map.
    exact_logits, exact_target = _number_position([0, -1, 3, 4])
    exact, _ = aligned_distillation(exact_logits, torch.tensor([0]), exact_target, beta)
    exact.backward()
    assert exact_logits.grad[0, packed] > 0


# ---- identity: the cross-tokenizer path with the student's own tokenizer is the normal path ----

@pytest.fixture(scope="module")
def same_tokenizer(tiny_models, second_teacher):
    """The student's tokenizer on both sides, and a teacher with no padded embedding rows: the dense path compares
    padded rows too, which the cross-tokenizer path (K counted in the teacher's tokenizer) leaves in the tail."""
    student, _ = tiny_models
    tokenizer = models.load_tokenizer(models.ModelRef(str(student)))
    model = models.load_frozen(models.ModelRef(str(second_teacher)), "float32")
    assert model.config.vocab_size == len(tokenizer)
    stop = models.stop_token_ids(tokenizer, models.ModelRef(str(student)))
    return tokenizer, model, VocabularyPair(tokenizer, tokenizer, stop, stop, "teacher")


@pytest.mark.parametrize("top_k,beta", [(1, 1.0), (1, 0.5), (20, 0.5), (20, 0.0), (20, 1.0), (None, 0.5),
                                        (None, 1.0)])
def test_with_one_tokenizer_the_loss_and_gradient_are_the_normal_paths(same_tokenizer, window, top_k, beta):  # noqa: F811
    tokenizer, model, pair = same_tokenizer
    batch = {**window, "teacher_prompt_ids": window["prompt_ids"], "teacher_prompt_mask": window["prompt_mask"]}
    positions = positions_of(batch)
    vocab = len(tokenizer)
    normal = LiveTeacher(model, top_k, beta, 1.0, 0).targets(positions, as_logits=True, vocab_size=vocab)
    cross_teacher = CrossTokenizerTeacher(LiveTeacher(model, top_k, beta, 1.0, 0), pair, top_k, beta, vocab)
    (fetched,) = cross_teacher.fetch([batch], vocab)
    aligned = cross_teacher.targets(positions_of(fetched), as_logits=False, vocab_size=vocab)
    assert bool(aligned.one_to_one.all()) and bool((aligned.chunk_of == -1).all())
    assert cross_teacher.pop_timings()["aligned_byte_share"] == 1.0

    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(positions.labels.shape[0], model.config.vocab_size, generator=generator) * 3
    options = losses.LossOptions(beta=beta)
    normal_logits = student_logits.clone().requires_grad_(True)
    expected = losses.logits_distillation_loss(normal_logits, normal, options, positions.labels, vocab).total
    expected.backward()
    cross_logits = student_logits.clone().requires_grad_(True)
    ours, _ = aligned_distillation(cross_logits[:, :vocab], positions.labels, aligned, beta)  # as the trainer does
    ours.backward()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cross_logits.grad, normal_logits.grad, rtol=1e-4, atol=1e-5)
