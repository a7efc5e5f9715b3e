"""Several teachers in one run, each sample learning from its own (`--teacher NAME=SOURCE` and a record's `teacher`
field, after MOPD's multi-teacher on-policy distillation): one `Teacher` holding named sub-teachers of any source.

Each batch row carries `teacher_index` (its teacher's place in `--teacher` order, set when the data is routed). Every
question is split by row: a sub-teacher is asked about its own rows only (a sub-batch of them), one with no rows in
a window costs nothing, and the answers come back as one `TargetPart` per sub-teacher for the loss to sum. A batch
whose rows all belong to one sub-teacher is handed to it whole, so a run with one `--teacher` asks exactly what a
run with `--teacher_model_name_or_path` asks.

Under DeepSpeed a live sub-teacher's forward and generation are collectives (ZeRO-3 gathers its shards on every
rank): there every live sub-teacher answers every micro-batch whole, on every rank, and its rows are picked after.
"""

from concurrent.futures import ThreadPoolExecutor

import torch

from ..losses import DenseTeacher, SparseTeacher
from .base import CompletionPositions, PrefetchedTeacher, SampleRequest, TargetPart, Teacher, TeacherUnavailable
from .targets import SparseTargets

ROUTED_KEY = "routed_targets"  # a mixed batch's prefetched top-K, by sub-teacher: {name: {SparseTargets key: tensor}}


class RoutedTeacher(Teacher):
    """`teachers`: the sub-teachers by name, in `--teacher` order (a row's `teacher_index` counts in it)."""

    def __init__(self, teachers: dict[str, Teacher]):
        self.teachers = dict(teachers)
        self._fetched_keys = {key for teacher in self.teachers.values() for key in teacher.fetched_keys}
        self.part_names = tuple(self.teachers)
        self.can_sample = all(teacher.can_sample for teacher in self.teachers.values())
        self._every_batch = False  # DeepSpeed: live sub-teachers answer every micro-batch (their calls are collective)

    @property
    def vocab_size(self) -> int | None:
        known = [teacher.vocab_size for teacher in self.teachers.values() if teacher.vocab_size]
        return min(known) if known else None

    def start(self, accelerator, deepspeed: bool) -> None:
        for teacher in self.teachers.values():
            teacher.start(accelerator, deepspeed)
        self._every_batch = deepspeed

    def _rows(self, teacher_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each sub-teacher's row numbers in a batch."""
        return {name: (teacher_index == number).nonzero().flatten() for number, name in enumerate(self.teachers)}

    def _answers_whole(self, teacher: Teacher) -> bool:
        return self._every_batch and not isinstance(teacher, PrefetchedTeacher)

    # ---- fetch: each sub-teacher that fetches ahead asked about its rows of the whole window, concurrently ----

    def fetch(self, batches: list[dict], vocab_size: int) -> list[dict]:
        batches = list(batches)
        jobs = {}  # name -> [(batch number, its rows or None for the whole batch)]
        for number, batch in enumerate(batches):
            if ROUTED_KEY in batch:  # fetched before
                continue
            rows = self._rows(batch["teacher_index"])
            size = batch["teacher_index"].shape[0]
            for name, selected in rows.items():
                if len(selected):
                    jobs.setdefault(name, []).append((number, None if len(selected) == size else selected))
            if not any(len(selected) == size for selected in rows.values()):
                batches[number] = {**batch, ROUTED_KEY: {}}
        jobs = {name: job for name, job in jobs.items() if self.teachers[name].fetched_keys}
        if not jobs:  # live teachers fetch nothing
            return batches
        with self.timed("teacher_seconds"):
            if len(jobs) > 1:  # served teachers answer at once, each over its own connections
                with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                    answers = dict(zip(jobs, pool.map(lambda name: self._fetch_one(name, jobs[name], batches,
                                                                                    vocab_size), jobs)))
            else:
                answers = {name: self._fetch_one(name, job, batches, vocab_size) for name, job in jobs.items()}
        for name, job in jobs.items():
            for (number, rows), answer in zip(job, answers[name]):
                keys = self.teachers[name].fetched_keys
                if rows is None:
                    batches[number] = answer
                elif all(key in answer for key in keys):
                    batches[number][ROUTED_KEY][name] = {key: answer[key] for key in keys}
        return batches

    def _fetch_one(self, name: str, job: list, batches: list[dict], vocab_size: int) -> list[dict]:
        asked = [batches[number] if rows is None else _select_rows(batches[number], rows, self._fetched_keys)
                 for number, rows in job]
        try:
            return self.teachers[name].fetch(asked, vocab_size)
        except TeacherUnavailable as error:
            raise TeacherUnavailable(f"--teacher {name}: {error}") from error

    # ---- targets: one part per sub-teacher with rows in the micro-batch ----

    def targets(self, positions: CompletionPositions, as_logits: bool, vocab_size: int) -> list[TargetPart]:
        p = positions
        teacher_index = p.batch["teacher_index"]
        position_teacher = teacher_index[:, None].expand_as(p.mask)[p.mask]  # [N]: each position's teacher
        parts = []
        for number, (name, teacher) in enumerate(self.teachers.items()):
            rows = (teacher_index == number).nonzero().flatten()
            part = position_teacher == number
            if len(rows) == len(teacher_index) or self._answers_whole(teacher):
                target = teacher.targets(p, as_logits, vocab_size)  # the whole micro-batch, as one teacher
                if not len(rows):
                    continue  # asked only to keep the ranks' collectives in step
                if len(rows) < len(teacher_index):
                    target = _select_target(target, part)
            elif not len(rows):
                continue
            else:
                batch = _select_rows(p.batch, rows, self._fetched_keys)
                batch.update(p.batch.get(ROUTED_KEY, {}).get(name, {}))
                selected = CompletionPositions(batch, p.input_ids[rows], p.attention_mask[rows], p.columns,
                                               p.mask[rows], p.labels[part])
                target = teacher.targets(selected, as_logits, vocab_size)
            parts.append(TargetPart(part, name, target))
        return parts

    # ---- sample (--seq_kd): each row's completion from its own teacher ----

    def sample(self, request: SampleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(request.teacher_index)
        size = len(request.teacher_index)
        answers = []
        for name, teacher in self.teachers.items():
            selected = rows[name].tolist()
            if len(selected) == size and not self._every_batch:
                return teacher.sample(request)
            if self._answers_whole(teacher):
                ids, mask = teacher.sample(request)
                answers.append((selected, ids[selected], mask[selected]))
            elif selected:
                answers.append((selected, *teacher.sample(request.select(selected))))
        width = max(ids.shape[1] for _, ids, _ in answers)
        device = answers[0][1].device
        completion_ids = torch.full((size, width), request.sampling.pad_token_id, dtype=torch.long, device=device)
        completion_mask = torch.zeros((size, width), dtype=torch.long, device=device)
        for selected, ids, mask in answers:
            completion_ids[selected, :ids.shape[1]] = ids.to(device)
            completion_mask[selected, :mask.shape[1]] = mask.to(device)
        return completion_ids, completion_mask

    def chunked_loss_ok(self) -> bool:
        return all(teacher.chunked_loss_ok() for teacher in self.teachers.values())

    def pop_timings(self) -> dict[str, float]:
        """The sub-teachers' waits summed, but a window's fetch counted once, as the wall time it took; what else a
        sub-teacher reports (how well its tokenizer aligns, `--cross_tokenizer`) under its name, `KEY/NAME`."""
        own = super().pop_timings()
        timings = {}
        for teacher_name, teacher in self.teachers.items():
            for name, value in teacher.pop_timings().items():
                if name.endswith("_seconds"):
                    timings[name] = timings.get(name, 0.0) + value
                else:
                    timings[f"{name}/{teacher_name}"] = value
        if "teacher_seconds" in own:
            timings["teacher_seconds"] = own["teacher_seconds"]
        return timings


def _select_rows(batch: dict, rows: torch.Tensor, fetched_keys=()) -> dict:
    """The batch's per-row tensors at `rows` (what a teacher fetched ahead, per position, is not per row: left
    out)."""
    size = batch["completion_mask"].shape[0]
    skipped = (*SparseTargets.BATCH_KEYS, *fetched_keys, ROUTED_KEY)
    return {key: value[rows.to(value.device)] for key, value in batch.items()
            if key not in skipped and isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size}


def _select_target(target, positions: torch.Tensor):
    """A teacher's answer for the whole micro-batch, at some of its positions ([N] mask)."""
    if isinstance(target, DenseTeacher):
        return DenseTeacher(target.hidden[positions], target.weight, target.bias)
    if isinstance(target, SparseTeacher):
        return SparseTeacher(target.ids[positions], target.log_probs[positions], target.valid[positions])
    return target[positions]  # logits [N, V]
