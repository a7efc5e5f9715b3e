"""gkd/steps.py: each optimizer step's draws are pure functions of the seed and the step."""

import pytest
import torch

from gkd.steps import DATASET, STUDENT, TEACHER, completion_source, lmbda_at, lmbda_bounds, sampling_rng, step_seed


def test_seed_two_draws_one_off_policy_then_one_on_policy_step():
    """tests/test_deepspeed.py relies on it: its two-step runs see both kinds of step."""
    assert [completion_source(2, step, 0.5, False) for step in (0, 1)] == [DATASET, STUDENT]
    assert [completion_source(2, step, 0.5, True) for step in (0, 1)] == [TEACHER, STUDENT]


def test_the_on_policy_share_is_lmbda_and_the_endpoints_are_exact():
    sources = [completion_source(0, step, 0.3, False) for step in range(4000)]
    assert abs(sources.count(STUDENT) / len(sources) - 0.3) < 0.03
    assert all(completion_source(0, step, 0.0, True) == TEACHER for step in range(200))
    assert all(completion_source(0, step, 1.0, True) == STUDENT for step in range(200))


def test_purposes_and_ranks_get_unrelated_seeds():
    seeds = {step_seed(0, 5, "source"), step_seed(0, 5, "sampling"), step_seed(0, 5, "sampling", rank=1),
             step_seed(1, 5, "sampling"), step_seed(0, 6, "sampling")}
    assert len(seeds) == 5 and all(0 <= seed < 2**64 for seed in seeds)


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", [0.8, 0.8, 0.8, 0.8, 0.8, 0.8]),
        ("linear", [0.0, 0.2, 0.4, 0.6, 0.8, 0.8]),
        ("step", [0.0, 0.0, 0.0, 0.0, 0.8, 0.8]),
    ],
)
def test_lmbda_schedules(schedule, expected):
    got = [lmbda_at(step, 0.8, schedule, warmup_steps=4) for step in range(6)]
    assert got == pytest.approx(expected)


def test_lmbda_schedule_from_a_nonzero_start():
    assert lmbda_at(0, 1.0, "linear", 10, start=0.5) == 0.5
    assert lmbda_at(5, 1.0, "linear", 10, start=0.5) == pytest.approx(0.75)
    assert lmbda_at(3, 1.0, "step", 10, start=0.2) == 0.2
    with pytest.raises(ValueError):
        lmbda_at(0, 1.0, "cosine", 10)


@pytest.mark.parametrize("lmbda,schedule,warmup,start", [
    (0.5, "constant", 0, 0.0), (0.0, "constant", 0, 0.0), (1.0, "constant", 0, 0.0),
    (0.0, "step", 2, 1.0), (0.0, "linear", 4, 0.2), (1.0, "step", 3, 0.0), (1.0, "linear", 3, 1.0),
    (0.8, "linear", 4, 0.0),
])
def test_lmbda_bounds_are_the_extremes_of_every_steps_share(lmbda, schedule, warmup, start):
    """The one answer to 'does this run have on-policy (off-policy) steps': a schedule's start counts, e.g. --lmbda 0
    --lmbda_schedule step --lmbda_start 1 is on-policy for its first steps."""
    shares = [lmbda_at(step, lmbda, schedule, warmup, start) for step in range(warmup + 3)]
    assert lmbda_bounds(lmbda, schedule, warmup, start) == pytest.approx((min(shares), max(shares)))


def test_sampling_rng_is_a_function_of_the_step_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with sampling_rng(42, 7, 0, torch.device("cpu")):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # whatever the global RNG went through in between
    with sampling_rng(42, 7, 0, torch.device("cpu")):
        assert torch.equal(torch.rand(4), first)
    with sampling_rng(42, 8, 0, torch.device("cpu")):
        assert not torch.equal(torch.rand(4), first)
    with sampling_rng(42, 7, 1, torch.device("cpu")):
        assert not torch.equal(torch.rand(4), first)


