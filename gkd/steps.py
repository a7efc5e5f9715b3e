"""What each optimizer step does, as pure functions of the run's seed and the step: who writes the completions, the
on-policy share at that step, and the seed its sampling draws from.

Every rank computes the same answers without talking to the others, and a resumed run computes what the first run
did. TRL flips `random.random()` per micro-batch and per rank, so ranks disagree (ZeRO-3 then hangs) and a resumed run
samples differently.
"""

import contextlib
import hashlib

import torch

STUDENT, TEACHER, DATASET = "student", "teacher", "dataset"
LMBDA_SCHEDULES = ("constant", "linear", "step")


def step_seed(seed: int, step: int, purpose: str, rank: int = 0) -> int:
    """A 64-bit seed for one purpose at one step (and rank): hashed, so purposes and neighbouring steps are
    uncorrelated. The one seeding scheme of every per-step draw."""
    digest = hashlib.sha256(f"gkd:{purpose}:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def lmbda_at(step: int, lmbda: float, schedule: str = "constant", warmup_steps: int = 0, start: float = 0.0) -> float:
    """The on-policy share of optimizer step `step` (0-based).

    constant: `lmbda` throughout. linear: from `start` at step 0 to `lmbda` at `warmup_steps`, then `lmbda`.
    step: `start` for the first `warmup_steps` steps (off-policy with the default 0), then `lmbda`."""
    if schedule == "constant" or warmup_steps <= 0 or step >= warmup_steps:
        return lmbda
    if schedule == "linear":
        return start + (lmbda - start) * step / warmup_steps
    if schedule == "step":
        return start
    raise ValueError(f"unknown lmbda schedule {schedule!r}; expected one of {LMBDA_SCHEDULES}")


def lmbda_bounds(lmbda: float, schedule: str = "constant", warmup_steps: int = 0,
                 start: float = 0.0) -> tuple[float, float]:
    """The lowest and highest on-policy share `lmbda_at` gives any step of the run. A run has on-policy steps when the
    highest is above 0 and off-policy steps when the lowest is below 1: every check of either asks this function."""
    if schedule == "constant" or warmup_steps <= 0:
        return lmbda, lmbda
    return min(start, lmbda), max(start, lmbda)


def completion_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
    """Who writes the completions of optimizer step `step`, given that step's on-policy share `lmbda`."""
    coin = step_seed(seed, step, "source") / 2**64
    if coin < lmbda:
        return STUDENT
    return TEACHER if seq_kd else DATASET


@contextlib.contextmanager
def sampling_rng(seed: int, step: int, rank: int, device: torch.device):
    """Sample from a seed fixed by (seed, step, rank), and give the global RNG back untouched afterwards.

    Trainer restores `rng_state.pth` only after it drew the first resumed window, and completions are sampled while
    the window is drawn: sampling from the global RNG would make a resumed run's first window differ."""
    on_accelerator = device.type != "cpu"
    devices = [device] if on_accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if on_accelerator else None):
        torch.manual_seed(step_seed(seed, step, "sampling", rank))
        yield
