"""The one interface the trainer asks a teacher through, whichever source answers (docs/architecture.md, "Adding a
teacher source"). A source is opened once from the options (`gkd.teachers.open_teacher`), K decided then, and from
there the trainer never asks which kind it holds."""

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import GKDError
from ..sampling import Sampling
from .targets import SparseTargets


class TeacherUnavailable(GKDError):
    """The teacher could not answer (after its own retries): the trainer saves a checkpoint and stops the run
    between optimizer steps, so no step trains on missing teacher data."""


@dataclass
class CompletionPositions:
    """One micro-batch's completion positions as the loss sees them. `batch` is the padded micro-batch (ids, masks,
    `index`, and whatever `Teacher.fetch` put in it); `input_ids` and `attention_mask` are prompt + completion;
    hidden-state column `columns.start + t` predicts completion token t; `mask` selects the trained positions, row
    major, and `labels` [N] are their tokens."""

    batch: dict
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    columns: slice
    mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class SampleRequest:
    """Completions wanted for left-padded prompts: sampled as `sampling` says, each row from its own `seeds` entry (a
    server's), or by the trainer's own decode loop (`decode(model, prompt_ids, prompt_mask)`, which seeds, gathers
    and unwraps as the student's sampling does) for a model beside the student. A completion ends before any id at or
    beyond `vocab_size`, which the student cannot embed. `decode` takes another `Sampling` as a fourth argument (a
    teacher with its own stop tokens)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    sampling: Sampling
    seeds: list[int]
    vocab_size: int
    decode: Callable
    teacher_index: torch.Tensor | None = None  # each row's teacher, where several teach (the batches' column)
    # each row's prompt in a teacher's own tokens (--cross_tokenizer), left-padded, and its mask
    teacher_prompt_ids: torch.Tensor | None = None
    teacher_prompt_mask: torch.Tensor | None = None

    def select(self, rows: list[int]) -> "SampleRequest":
        """The same request for some of its rows (their seeds kept)."""
        def picked(values):
            return None if values is None else values[rows]

        return SampleRequest(self.prompt_ids[rows], self.prompt_mask[rows], self.sampling,
                             [self.seeds[row] for row in rows], self.vocab_size, self.decode,
                             picked(self.teacher_index), picked(self.teacher_prompt_ids),
                             picked(self.teacher_prompt_mask))


@dataclass
class TargetPart:
    """One teacher's share of a micro-batch's targets, where several teachers answer it: `rows` [N] selects its
    completion positions (row-major over the batch's completion mask, as `CompletionPositions.mask` orders them) and
    `target` is what `Teacher.targets` gives for them alone. The loss is summed part by part."""

    rows: torch.Tensor
    name: str
    target: object


class Teacher:
    """A teacher's signal, for a window of completions.

    `top_k`: decided when the source opens; None means the full vocabulary (a live teacher's dense path).
    `vocab_size`: the rows of a live teacher's embedding (samples must stay below it), None where unknown.
    """

    top_k: int | None = None
    vocab_size: int | None = None
    can_sample: bool = False
    fetched_keys: tuple[str, ...] = ()  # what `fetch` adds to a batch, per completion position (none: answers live)
    part_names: tuple[str, ...] = ()  # the parts `targets` may answer in (several teachers), for per-part logs

    def start(self, accelerator, deepspeed: bool) -> None:
        """When the trainer is built, after the student: load a model beside the student and place it on the run's
        devices (under ZeRO-3: sharded). Nothing for sources that were opened whole."""

    def fetch(self, batches: list[dict], vocab_size: int) -> list[dict]:
        """Before a window's first forward: what a source must fetch ahead (a cache's or a server's top-K), carried in
        the batches. Raises `TeacherUnavailable` if it cannot."""
        return batches

    def targets(self, positions: CompletionPositions, as_logits: bool, vocab_size: int):
        """What the loss compares the student against at `positions`: a `losses.DenseTeacher` (hidden states and
        head, for the chunked loss), teacher logits [N, V] (`as_logits`, for the full-logits loss), or a
        `losses.SparseTeacher` (top-K); or, from several teachers, a list of `TargetPart`s, one per teacher of
        `part_names` with rows here. Ids at or beyond `vocab_size` are not real tokens of both models."""
        raise NotImplementedError

    def sample(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions (`--seq_kd`) as ids [B, C] and a mask that keeps each row's first stop token."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample completions")

    def chunked_loss_ok(self) -> bool:
        """Whether the chunked loss may read this teacher's lm_head directly (a plain, whole Linear)."""
        return True

    def pop_timings(self) -> dict[str, float]:
        """Seconds the run waited on this teacher since the last call, by what it waited for (`teacher_seconds`,
        `teacher_sampling_seconds`), for the step's log; empty where nothing was timed."""
        timings, self._timings = dict(getattr(self, "_timings", {})), defaultdict(float)
        return timings

    @contextmanager
    def timed(self, name: str):
        if not hasattr(self, "_timings"):
            self._timings = defaultdict(float)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._timings[name] += time.perf_counter() - started


class PrefetchedTeacher(Teacher):
    """A source whose top-K is fetched for a whole window ahead of its first forward and carried in the batches (a
    cache, a server): `lookup` is its one question. `beta` picks the sampled-token support at K = 1, beta = 1."""

    beta: float = 0.5
    fetched_keys = SparseTargets.BATCH_KEYS

    def lookup(self, batch: dict, vocab_size: int) -> SparseTargets:
        """The top-K at every completion position of one padded micro-batch."""
        raise NotImplementedError

    def fetch(self, batches: list[dict], vocab_size: int) -> list[dict]:
        with self.timed("teacher_seconds"):
            return [batch if SparseTargets.from_batch(batch) else self.lookup(batch, vocab_size).into_batch(batch)
                    for batch in batches]

    def targets(self, positions: CompletionPositions, as_logits: bool, vocab_size: int):
        return SparseTargets.from_batch(positions.batch).for_loss(self.top_k, self.beta, positions.labels)
