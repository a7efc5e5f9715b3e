"""A teacher with a tokenizer of its own (`--cross_tokenizer`): any source asked in the teacher's tokens, its answers
brought to the student's completion positions through byte-span chunks (`alignment`).

Before a window's first forward, each completion (the dataset's or the student's) is read back as text from the
student's tokens, tokenized by the teacher after the teacher's own rendering of the prompt (`teacher_prompt_ids`,
encoded with the data), and the source answers that sequence as it would for a student of its own family: its top-K
and the log-probability of each of its tokens. The end-of-turn token of one side is paired with the other's. The loss
(`gkd.cross_tokenizer_loss`) compares distributions where a chunk is 1:1 and sampled chunk likelihoods elsewhere.

Bytes outside any character go to the teacher as its byte tokens; from the first byte or character the teacher cannot
write, a completion is left out of the loss (`aligned_completions` logs the share compared at all).
"""

import logging
from dataclasses import dataclass, field

import torch

from ..batching import pad_batch
from ..cross_tokenizer_loss import AlignedTeacher
from ..losses import SparseTeacher
from .alignment import Chunk, VocabularyPair, align, tokenize_bytes, utf8_runs
from .base import CompletionPositions, SampleRequest, Teacher
from .server import completion_tensors
from .targets import SparseTargets, completion_rows

BATCH_KEYS = ("aligned_ids", "aligned_log_probs", "aligned_valid", "aligned_one_to_one", "aligned_chunk_of",
              "aligned_chunk_log_probs", "aligned_teacher_log_probs")


@dataclass
class RowAlignment:
    """One completion on the teacher's side: its tokens there, the chunks, and its bytes (all, and in 1:1 chunks)."""

    teacher_ids: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    text_bytes: int = 0
    one_to_one_bytes: int = 0
    aligned: bool = True


class CrossTokenizerTeacher(Teacher):
    """`source` answers `lookup(batch, vocab_size) -> SparseTargets` for batches in the teacher's tokens (a live
    model, a server) and is started as the run's teacher. `top_k` None: the teacher's whole vocabulary."""

    vocab_size = None  # the student samples from its own vocabulary: nothing is shared to stay below
    fetched_keys = BATCH_KEYS  # every source is asked ahead, in the teacher's tokens

    def __init__(self, source, pair: VocabularyPair, top_k: int | None, beta: float, teacher_vocab_size: int,
                 max_length: int | None = None):
        self.source, self.pair = source, pair
        self.can_sample = source.can_sample
        self.top_k, self.beta, self.teacher_vocab_size = top_k, beta, teacher_vocab_size
        self.tokens = TeacherTokens(pair, max_length)
        self.teacher_pad_id = self.tokens.pad_id
        self._groups = {}

    def start(self, accelerator, deepspeed: bool) -> None:
        self.source.start(accelerator, deepspeed)

    def chunked_loss_ok(self) -> bool:
        return False  # the loss needs the student's logits over its vocabulary to sum them per teacher token

    def fetch(self, batches: list[dict], vocab_size: int) -> list[dict]:
        with self.timed("teacher_seconds"):
            return [batch if "aligned_ids" in batch else self._fetch_one(batch) for batch in batches]

    def sample(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """`--seq_kd`: the teacher continues its own rendering of each prompt with its own stop tokens; each
        completion is read back as text and tokenized for the student (at most --max_new_tokens student tokens, its
        end of turn kept as the student's)."""
        pair = self.pair
        sampling = request.sampling.but(stop_token_ids=tuple(pair.teacher_stop_ids), pad_token_id=self.teacher_pad_id,
                                        suppress_ids=())
        asked = SampleRequest(request.teacher_prompt_ids, request.teacher_prompt_mask, sampling, request.seeds,
                              self.teacher_vocab_size, lambda model, ids, mask: request.decode(model, ids, mask,
                                                                                                 sampling))
        teacher_ids, teacher_mask = self.source.sample(asked)
        stops = set(pair.teacher_stop_ids)
        rows = []
        for ids, mask in zip(teacher_ids.tolist(), teacher_mask.tolist()):
            ids = [token for token, kept in zip(ids, mask) if kept]
            stopped = bool(ids) and ids[-1] in stops
            rows.append((stopped, b"".join(pair.teacher_pieces(ids[:-1] if stopped else ids))))
        written = tokenize_bytes(pair.student, pair.student_byte_ids, [data for _, data in rows])
        limit = request.sampling.max_new_tokens
        completions = []
        for (stopped, _), (ids, whole) in zip(rows, written):
            stopped = stopped and whole  # a byte the student has no token for ends the completion before it
            if stopped and len(ids) < limit:
                ids.append(pair.student_stop_ids[0])
            completions.append(ids[:limit])
        return completion_tensors(completions, request)

    def pop_timings(self) -> dict[str, float]:
        """The waits, and how well the window's completions aligned: `aligned_byte_share` (completion bytes in 1:1
        chunks), `chunks_per_completion`, `aligned_completions` (the share the teacher could be given at all)."""
        return {**super().pop_timings(), **self.tokens.pop_stats()}

    def targets(self, positions: CompletionPositions, as_logits: bool, vocab_size: int) -> AlignedTeacher:
        batch = positions.batch
        device = batch["aligned_ids"].device
        if device not in self._groups:
            self._groups[device] = self.pair.student_group.to(device)
        sparse = SparseTeacher(batch["aligned_ids"], batch["aligned_log_probs"], batch["aligned_valid"])
        return AlignedTeacher(sparse, self._groups[device], self.teacher_vocab_size, batch["aligned_one_to_one"],
                              batch["aligned_chunk_of"], batch["aligned_chunk_log_probs"],
                              batch["aligned_teacher_log_probs"])

    # ---- one micro-batch ----

    def _fetch_one(self, batch: dict) -> dict:
        rows, plans, teacher_batch = self.tokens.teacher_batch(batch)
        answer = self.source.lookup(teacher_batch, self.teacher_vocab_size)
        if self.top_k is not None and answer.ids.shape[1] > self.top_k:  # a cache holds more than the run asks
            answer = SparseTargets(answer.ids[:, :self.top_k], answer.log_probs[:, :self.top_k],
                                   answer.valid[:, :self.top_k], answer.actual_log_probs)
        teacher_tokens = teacher_batch["completion_ids"][teacher_batch["completion_mask"].bool()]
        return {**batch, **dict(zip(BATCH_KEYS, self._at_student_positions(rows, plans, answer, teacher_tokens)))}

    def _at_student_positions(self, rows, plans, answer, teacher_tokens) -> tuple[torch.Tensor, ...]:
        """The teacher's answer, given at teacher positions, laid out at the student's (row-major, as the loss reads
        them): its top-K where a 1:1 chunk starts, chunk indices and chunk log-probabilities for m:n chunks."""
        total = sum(len(completion) for completion in rows)
        k = answer.ids.shape[1]
        one_student, one_teacher, member_student, member_chunk, chunk_teacher, chunk_of_teacher = [], [], [], [], [], []
        student_offset = teacher_offset = 0
        chunks = 0
        for completion, plan in zip(rows, plans):
            for chunk in plan.chunks:
                if chunk.one_to_one:
                    one_student.append(student_offset + chunk.student_start)
                    one_teacher.append(teacher_offset + chunk.teacher_start)
                    continue
                member_student.extend(range(student_offset + chunk.student_start, student_offset + chunk.student_end))
                member_chunk.extend([chunks] * (chunk.student_end - chunk.student_start))
                chunk_teacher.extend(range(teacher_offset + chunk.teacher_start, teacher_offset + chunk.teacher_end))
                chunk_of_teacher.extend([chunks] * (chunk.teacher_end - chunk.teacher_start))
                chunks += 1
            student_offset += len(completion)
            teacher_offset += len(plan.teacher_ids)
        ids = torch.zeros(total, k, dtype=torch.long)
        log_probs = torch.full((total, k), float("-inf"))
        valid = torch.zeros(total, k, dtype=torch.bool)
        one_to_one = torch.zeros(total, dtype=torch.bool)
        teacher_log_probs = torch.zeros(total)
        chunk_of = torch.full((total,), -1, dtype=torch.long)
        actual = answer.actual_log_probs.float().cpu()
        one_student, one_teacher = torch.tensor(one_student, dtype=torch.long), torch.tensor(one_teacher,
                                                                                              dtype=torch.long)
        if len(one_student):
            if self.top_k == 1 and self.beta == 1.0:  # K = 1, reverse KL: the sampled token, as the normal path
                ids[one_student, 0] = teacher_tokens[one_teacher]
                log_probs[one_student, 0] = actual[one_teacher]
                valid[one_student, 0] = torch.isfinite(actual[one_teacher])
            else:
                ids[one_student] = answer.ids.cpu()[one_teacher]
                log_probs[one_student] = answer.log_probs.float().cpu()[one_teacher]
                valid[one_student] = answer.valid.cpu()[one_teacher]
            one_to_one[one_student] = True
            teacher_log_probs[one_student] = actual[one_teacher]
        chunk_log_probs = torch.zeros(chunks)
        if chunks:
            chunk_of[torch.tensor(member_student)] = torch.tensor(member_chunk)
            chunk_log_probs.index_add_(0, torch.tensor(chunk_of_teacher), actual[torch.tensor(chunk_teacher)])
        return ids, log_probs, valid, one_to_one, chunk_of, chunk_log_probs, teacher_log_probs


class TeacherTokens:
    """Completions in the student's tokens as the teacher tokenizes them (`teacher_batch`), with the chunks that
    align the two, and running counts of how well they align (`pop_stats`). What a cross-tokenizer teacher asks its
    source with, and what a cache in the teacher's tokens is built from (gkd/tools/cache_teacher.py).

    `max_length` bounds the teacher's sequence as the run's bounds the student's: a completion the teacher writes in
    more tokens (digits one by one, emoji byte by byte) is compared up to the last chunk that fits."""

    def __init__(self, pair: VocabularyPair, max_length: int | None = None):
        self.pair, self.max_length = pair, max_length
        teacher = pair.teacher
        self.pad_id = next((i for i in (teacher.pad_token_id, teacher.eos_token_id) if i is not None), 0)
        self._stats = dict.fromkeys(("text_bytes", "one_to_one_bytes", "chunks", "completions", "aligned"), 0)
        self._said_unaligned = False

    def teacher_batch(self, batch: dict) -> tuple[list[list[int]], list[RowAlignment], dict]:
        """A padded micro-batch of the student's (with `teacher_prompt_ids`): its completions, their alignments,
        and the batch the teacher reads: its prompts and the completions in its tokens (`index` kept, a cache's
        key)."""
        rows = [completion for _, completion in completion_rows(batch)]
        teacher_prompts = [ids[mask.bool()].tolist()
                           for ids, mask in zip(batch["teacher_prompt_ids"], batch["teacher_prompt_mask"])]
        rooms = None if self.max_length is None else [self.max_length - len(prompt) for prompt in teacher_prompts]
        plans = self.align_rows(rows, rooms)
        samples = [{"prompt_ids": prompt, "completion_ids": plan.teacher_ids}
                   for prompt, plan in zip(teacher_prompts, plans)]
        if "index" in batch:
            for sample, index in zip(samples, batch["index"].tolist()):
                sample["index"] = index
        return rows, plans, pad_batch(samples, self.pad_id)

    def pop_stats(self) -> dict[str, float]:
        """Since the last call: `aligned_byte_share` (completion bytes in 1:1 chunks), `chunks_per_completion`,
        `aligned_completions` (the share the teacher could be given at all); empty when no completion came."""
        stats, shares = self._stats, {}
        if stats["completions"] and not stats["aligned"] and not self._said_unaligned:
            self._said_unaligned = True  # once: the run's metrics show every such window (aligned_completions 0)
            logging.getLogger("gkd").warning(
                "--cross_tokenizer: none of %d completions could be given to the teacher (each starts with a "
                "character it has no token for): they train nothing; aligned_completions in metrics.jsonl counts "
                "them", stats["completions"])
        if stats["completions"]:
            shares["aligned_byte_share"] = stats["one_to_one_bytes"] / max(stats["text_bytes"], 1)
            shares["chunks_per_completion"] = stats["chunks"] / stats["completions"]
            shares["aligned_completions"] = stats["aligned"] / stats["completions"]
        self._stats = dict.fromkeys(stats, 0)
        return shares

    def align_rows(self, rows: list[list[int]], rooms: list[int] | None = None) -> list[RowAlignment]:
        """Each completion's text as the teacher tokenizes it, and the chunks of the two tokenizations. Text is
        tokenized run by run (one batched call, special-token text taken as text); bytes outside any character are
        given as the teacher's byte tokens. Where the teacher's tokens stop spelling the text (a character it has no
        token for), or exceed the row's room (`rooms`: tokens left after its prompt, end of turn included), the
        comparison ends at the last offset both sides cut."""
        pair = self.pair
        stops = set(pair.student_stop_ids)
        prepared, texts = [], []
        for completion in rows:
            stopped = bool(completion) and completion[-1] in stops
            text_ids = completion[:-1] if stopped else completion
            pieces = pair.student_pieces(text_ids)
            kept = _writable_tokens(pieces, pair.teacher_writable)
            runs = utf8_runs(b"".join(pieces[:kept]))
            prepared.append((stopped, text_ids, pieces, kept, runs))
            texts.extend(run.decode() for run, is_text in runs if is_text)
        tokenized = iter(pair.teacher(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                         if texts else [])
        plans = []
        for row, (completion, (stopped, text_ids, pieces, kept, runs)) in enumerate(zip(rows, prepared)):
            plan = RowAlignment(text_bytes=sum(map(len, pieces)))
            teacher_ids, teacher_pieces, shifted = [], [], set()
            for run, is_text in runs:
                ids = next(tokenized) if is_text else [pair.teacher_byte_ids[byte] for byte in run]
                run_pieces = pair.teacher_pieces(ids)
                if is_text and _writes_a_space_first(run_pieces, run):
                    # SentencePiece's Prepend("▁"): its first token spells a space the text does not have; it is
                    # the teacher's way to start, so it is kept, and compared by its sampled likelihood only
                    shifted.add(len(teacher_ids))
                    run_pieces = [run_pieces[0][1:], *run_pieces[1:]]
                teacher_ids.extend(ids)
                teacher_pieces.extend(run_pieces)
            text = b"".join(pieces[:kept])
            cut = rooms is not None and len(teacher_ids) + stopped > rooms[row]  # its end of turn needs a place too
            if cut:
                fits = max(rooms[row] - stopped, 0)
                teacher_ids, teacher_pieces = teacher_ids[:fits], teacher_pieces[:fits]
            student_end, teacher_end = _common_prefix_cut(pieces[:kept], teacher_pieces, text)
            if student_end == 0 and kept:
                plan.aligned = False
                plans.append(plan)
                continue
            whole = not cut and student_end == kept and teacher_end == len(teacher_ids)
            plan.teacher_ids = teacher_ids[:teacher_end]
            plan.chunks = align(pieces[:student_end], teacher_pieces[:teacher_end]) if student_end else []
            for chunk in plan.chunks:
                chunk.shifted = any(index in shifted for index in range(chunk.teacher_start, chunk.teacher_end))
            if whole and stopped and kept == len(text_ids) and pair.teacher_stop_for(completion[-1]) >= 0:
                plan.chunks.append(Chunk(kept, kept + 1, len(teacher_ids), len(teacher_ids) + 1))
                plan.teacher_ids.append(pair.teacher_stop_for(completion[-1]))
            plan.one_to_one_bytes = sum(len(pieces[chunk.student_start]) for chunk in plan.chunks
                                        if chunk.one_to_one and chunk.student_start < len(pieces))
            plans.append(plan)
        for completion, plan in zip(rows, plans):
            if completion:
                self._stats["completions"] += 1
                self._stats["aligned"] += plan.aligned
                self._stats["chunks"] += len(plan.chunks)
                self._stats["text_bytes"] += plan.text_bytes
                self._stats["one_to_one_bytes"] += plan.one_to_one_bytes
        return plans


def _writes_a_space_first(pieces: list[bytes], text: bytes) -> bool:
    return bool(pieces) and pieces[0].startswith(b" ") and b"".join(pieces) == b" " + text


def _common_prefix_cut(student: list[bytes], teacher: list[bytes], text: bytes) -> tuple[int, int]:
    """How many leading tokens of each side to keep: all where the teacher spells `text`, else up to the last byte
    offset before the first byte it spells differently where both sides end a token."""
    spelled = b"".join(teacher)
    if spelled == text:
        return len(student), len(teacher)
    differs = next((i for i, (a, b) in enumerate(zip(spelled, text)) if a != b), min(len(spelled), len(text)))
    ends, offset = {}, 0
    for index, piece in enumerate(teacher):
        offset += len(piece)
        if offset > differs:
            break
        ends[offset] = index + 1
    offset, best = 0, (0, 0)
    for index, piece in enumerate(student):
        offset += len(piece)
        if offset > differs:
            break
        if offset in ends:
            best = (index + 1, ends[offset])
    return best


def _writable_tokens(pieces: list[bytes], writable) -> int:
    """How many leading tokens spell bytes the teacher can be given (`writable(data)`: how many leading bytes): a
    completion is compared up to the first byte the teacher has no token for."""
    ends, offset = [], 0
    for piece in pieces:
        offset += len(piece)
        ends.append(offset)
    data = b"".join(pieces)
    limit = writable(data)
    while True:  # a prefix ending inside a character has bytes outside one: check them again
        kept = sum(end <= limit for end in ends)
        boundary = ends[kept - 1] if kept else 0
        limit = writable(data[:boundary])
        if limit == boundary:
            return kept
