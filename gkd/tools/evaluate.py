"""How close is a student to its teacher? Metrics on a validation set, as JSON and a Markdown table; curves as PNG.

    gkd-eval --student S [--student NAME=S2 ...] --teacher T --dataset_name val.jsonl --output_dir O
    gkd-eval --student S --teacher math=T1 --teacher chat=T2 [--default_teacher chat] ...  # each record its own
    gkd-eval --plot_run runs/x          # training curves from runs/x/metrics.jsonl -> PNG
    (python -m gkd.evaluate ... is the same command)

Students and teacher are model folders or Hub ids; a `--use_peft` run's folder is its base with the adapter merged.
Metrics, per student:
- reverse_kl, jsd: per-token divergence from the teacher on completions the student samples itself (temperature 1):
  what on-policy distillation minimises.
- teacher_nll: per-token negative log-likelihood of the teacher's greedy responses under the student.
- answer_accuracy: share of records with `answers` whose greedy response contains one (case-insensitive; as written
  with --match_case, for answers whose case is the skill, e.g. a reply in capitals).
- mean_response_tokens: length of the student's greedy responses.
Each of the first four gets a 95% bootstrap interval over prompts (`*_ci`); per-prompt values are in eval.json, so
two students can be compared on the same prompts (`paired_difference`). With several teachers (`--teacher NAME=T`,
as training takes them), each record is scored against the teacher its `teacher` field names (or
`--default_teacher`), the reference row is each record's own teacher, and `reverse_kl/NAME` is reported per teacher.

Across tokenizers (a student trained with `--cross_tokenizer`): where any student's token-to-id map differs from the
teacher's, every model of the run (so that rows stay comparable) is scored by text, and eval.json says
`"across_tokenizers": true`. Each model renders each prompt with its own tokenizer and chat template and stops on its
own stop tokens; answer_accuracy and mean_response_tokens are as above (its own tokens).
- teacher_nll: the teacher's greedy response as text, tokenized by the student after the student's prompt (its end
  of turn where the teacher stopped); the student's summed NLL divided by the teacher's tokens of that response.
- reverse_kl: on the student's own sample y (temperature 1), (log p_S(y) - log p_T(y)) / (teacher tokens of y), with
  y tokenized by the teacher after the teacher's prompt (its end of turn where the student stopped): a sampled
  estimate of the sequence-level KL, which can be negative on a prompt.
- jsd: not defined without one vocabulary: null, "-" in the table.
Text goes from one model to the other as a `--cross_tokenizer` teacher is given a completion (the bytes of each token,
gkd/teachers/alignment.py): re-tokenized canonically by the other side, which may cut it otherwise than a model
sampling it would (a SentencePiece tokenizer that writes a space first keeps it). Between two models that share a
tokenizer the ids pass as they are, so the teacher's row and a student of the teacher's tokenizer get exactly the
per-token path's teacher_nll, and the teacher's own reverse_kl is 0. A response with a byte the other side has no
token for is left out of both metrics (`unwritable_responses`). Several teachers are refused across tokenizers.
"""

import json
import logging
import random
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gkd import losses
from gkd.batching import pad_batch
from gkd.errors import ConfigError, GKDError

logger = logging.getLogger(__name__)


@dataclass
class Responses:
    """Greedy responses of one model to every prompt: token ids (stop included) and decoded text."""

    ids: list[list[int]]
    texts: list[str]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: list[list[int]], stop_ids, max_new_tokens, batch_size) -> Responses:
    ids = generate_responses(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size, temperature=None)
    return Responses(ids, [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in ids])


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[list[int]], stop_ids, max_new_tokens, batch_size,
                       temperature: float | None, suppress_ids=()) -> list[list[int]]:
    """Each prompt's response as token ids (its stop token last where it stopped); `temperature` None: greedy."""
    from gkd.generation import generate
    from gkd.sampling import Sampling

    ids = []
    for chunk in _batches(prompts, batch_size):
        batch = pad_batch([{"prompt_ids": p, "completion_ids": []} for p in chunk], tokenizer.pad_token_id)
        completion, mask = generate(model, batch["prompt_ids"], batch["prompt_mask"], Sampling(
            max_new_tokens, stop_ids, tokenizer.pad_token_id, temperature=temperature, suppress_ids=suppress_ids))
        ids += [row[row_mask.bool()].tolist() for row, row_mask in zip(completion, mask)]
    return ids


@torch.no_grad()
def _completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    keep = completion_ids.shape[1] + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return logits[:, :-1].float()


@torch.no_grad()
def divergences(student, teacher, tokenizer, prompts, stop_ids, max_new_tokens, batch_size, seed) -> dict:
    """Per prompt: summed reverse KL and JSD over the student's own sample at temperature 1, and its token count."""
    from gkd.generation import generate
    from gkd.sampling import Sampling

    torch.manual_seed(seed)
    per_prompt = {"reverse_kl": [], "jsd": [], "sample_tokens": []}
    for chunk in _batches(prompts, batch_size):
        batch = pad_batch([{"prompt_ids": p, "completion_ids": []} for p in chunk], tokenizer.pad_token_id)
        completion, mask = generate(student, batch["prompt_ids"], batch["prompt_mask"], Sampling(
            max_new_tokens, stop_ids, tokenizer.pad_token_id, temperature=1.0))
        args = (batch["prompt_ids"], batch["prompt_mask"], completion, mask)
        student_logits, teacher_logits = losses.align_vocab(
            _completion_logits(student, *args), _completion_logits(teacher, *args)
        )
        kept = mask.bool()
        for name, beta in (("reverse_kl", 1.0), ("jsd", 0.5)):
            # A divergence is never negative: what float32 rounding leaves below 0 (about -1e-8 per token for two
            # equal distributions, the teacher against itself) is 0.
            per_token = losses.generalized_jsd(student_logits, teacher_logits, beta).clamp_min(0.0)
            per_prompt[name] += torch.where(kept, per_token, 0.0).sum(dim=1).tolist()
        per_prompt["sample_tokens"] += kept.sum(dim=1).tolist()
    return per_prompt


@torch.no_grad()
def teacher_nll(student, tokenizer, prompts, teacher_answers: Responses, batch_size) -> dict:
    """Per prompt: summed NLL of the teacher's greedy response under the student, and its token count."""
    return {"teacher_nll": completion_nll(student, tokenizer, prompts, teacher_answers.ids, batch_size),
            "teacher_tokens": [len(ids) for ids in teacher_answers.ids]}


@torch.no_grad()
def completion_nll(model, tokenizer, prompts, completions: list[list[int]], batch_size) -> list[float]:
    """Per prompt: the model's summed negative log-likelihood of the completion's tokens after the prompt (over the
    tokenizer's ids, where the embedding is padded beyond them)."""
    summed = []
    samples = [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompts, completions)]
    for chunk in _batches(samples, batch_size):
        if not any(sample["completion_ids"] for sample in chunk):
            summed += [0.0] * len(chunk)
            continue
        batch = pad_batch(chunk, tokenizer.pad_token_id)
        logits = _completion_logits(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
        )
        logits = logits[..., : len(tokenizer)] if logits.shape[-1] > len(tokenizer) else logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["completion_ids"], reduction="none")
        summed += torch.where(batch["completion_mask"].bool(), nll, 0.0).sum(dim=1).tolist()
    return summed


def answer_hits(texts: list[str], answers: list[list[str] | None], match_case: bool = False) -> list[int | None]:
    """Per prompt: 1 when the response contains an accepted answer (case-insensitive, or as written with
    `match_case`), 0 when not, None when the record has no `answers`."""
    fold = (lambda text: text) if match_case else str.lower
    return [None if not options else int(any(fold(option) in fold(text) for option in options))
            for text, options in zip(texts, answers)]


# (metric, per-prompt numerator, per-prompt denominator or None for a plain mean over checked prompts)
RATIOS = {
    "reverse_kl": ("reverse_kl", "sample_tokens"),
    "jsd": ("jsd", "sample_tokens"),
    "teacher_nll": ("teacher_nll", "teacher_tokens"),
    "answer_accuracy": ("answer_hits", None),
}


def _ratio(per_prompt: dict, metric: str, rows: list[int]) -> float | None:
    numerator, denominator = RATIOS[metric]
    values = per_prompt[numerator]
    if denominator is None:
        checked = [values[row] for row in rows if values[row] is not None]
        return sum(checked) / len(checked) if checked else None
    tokens = sum(per_prompt[denominator][row] for row in rows)
    return sum(values[row] for row in rows) / max(tokens, 1)


def bootstrap_interval(per_prompt: dict, metric: str, samples: int = 1000, seed: int = 0,
                       reference: dict | None = None) -> tuple[float, float] | None:
    """95% percentile interval of `metric` over prompts resampled with replacement (seeded); with `reference`, of the
    difference metric(per_prompt) - metric(reference) on the same resampled prompts (a paired comparison)."""
    count = len(per_prompt[RATIOS[metric][0]])
    if count == 0 or _ratio(per_prompt, metric, list(range(count))) is None:
        return None
    rng = random.Random(seed)
    draws = []
    for _ in range(samples):
        rows = [rng.randrange(count) for _ in range(count)]
        value = _ratio(per_prompt, metric, rows)
        if reference is not None and value is not None:
            other = _ratio(reference, metric, rows)
            value = None if other is None else value - other
        if value is not None:
            draws.append(value)
    draws.sort()
    if not draws:
        return None
    return draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]


def paired_difference(report: dict, name: str, reference: str, metric: str, samples: int = 1000, seed: int = 0):
    """`name` minus `reference` on `metric` over the same prompts, with its 95% bootstrap interval:
    (difference, (low, high)). An interval that excludes 0 is a difference this evaluation can see."""
    per_prompt, other = report["per_prompt"][name], report["per_prompt"][reference]
    rows = list(range(len(per_prompt[RATIOS[metric][0]])))
    value, base = _ratio(per_prompt, metric, rows), _ratio(other, metric, rows)
    if value is None or base is None:
        return None, None
    return value - base, bootstrap_interval(per_prompt, metric, samples, seed, reference=other)


def evaluate_students(
    students: dict, teacher, tokenizer, conversations, stop_ids, max_new_tokens=48, batch_size=8, seed=0,
    bootstrap_samples=1000, routes: list[str] | None = None, match_case: bool = False,
) -> dict:
    """Metrics for each named student against one teacher; the teacher's greedy responses are computed once.

    Several teachers: `teacher` is a dict of them by name and `routes` names each conversation's; every prompt is
    scored against its own teacher (prompts grouped by teacher, in their order), and a student may be such a dict
    too (the reference row: each prompt answered by its own teacher)."""
    from gkd.data import encode_conversations

    samples, _ = encode_conversations(conversations, tokenizer, 4096, max_new_tokens, stop_ids)
    prompts = [sample["prompt_ids"] for sample in samples]
    answers = [conversation.answers for conversation in conversations]
    teachers = teacher if isinstance(teacher, dict) else {None: teacher}
    routes = routes or [None] * len(prompts)
    groups = {name: [row for row, route in enumerate(routes) if route == name] for name in teachers}
    groups = {name: rows for name, rows in groups.items() if rows}

    def by_group(ask) -> dict:
        """`ask(name, its prompts)` per teacher's group, each per-prompt list put back in prompt order."""
        stitched = {}
        for name, rows in groups.items():
            for key, values in ask(name, [prompts[row] for row in rows]).items():
                column = stitched.setdefault(key, [None] * len(prompts))
                for row, value in zip(rows, values):
                    column[row] = value
        return stitched

    def greedy(model):
        answered = by_group(lambda name, chunk: vars(greedy_responses(
            _model_for(model, name), tokenizer, chunk, stop_ids, max_new_tokens, batch_size)))
        return Responses(answered["ids"], answered["texts"])

    teacher_answers = greedy(teachers)
    report = {"num_prompts": len(prompts), "max_new_tokens": max_new_tokens, "seed": seed,
              "bootstrap_samples": bootstrap_samples, "models": {}, "per_prompt": {}, "samples": []}
    responses = {}
    for name, student in tqdm(students.items(), desc="evaluating", unit="model", total=len(students)):
        for model in (student.values() if isinstance(student, dict) else [student]):
            model.eval()
        own = greedy(student)
        responses[name] = own.texts
        per_prompt = {
            **by_group(lambda group, chunk: divergences(_model_for(student, group), teachers[group], tokenizer, chunk,
                                                        stop_ids, max_new_tokens, batch_size, seed)),
            **by_group(lambda group, chunk: teacher_nll(
                _model_for(student, group), tokenizer, chunk,
                Responses(*([values[row] for row in groups[group]] for values in (teacher_answers.ids,
                                                                                   teacher_answers.texts))),
                batch_size)),
            "answer_hits": answer_hits(own.texts, answers, match_case),
            "response_tokens": [len(ids) for ids in own.ids],
        }
        rows = list(range(len(prompts)))
        metrics = {metric: _ratio(per_prompt, metric, rows) for metric in RATIOS}
        metrics.update({f"{metric}_ci": bootstrap_interval(per_prompt, metric, bootstrap_samples, seed)
                        for metric in RATIOS})
        metrics["mean_response_tokens"] = sum(per_prompt["response_tokens"]) / max(len(prompts), 1)
        metrics["checked_prompts"] = sum(hit is not None for hit in per_prompt["answer_hits"])
        if None not in teachers:  # several teachers: each one's reverse KL over its own prompts
            metrics.update({f"reverse_kl/{group}": _ratio(per_prompt, "reverse_kl", rows)
                            for group, rows in groups.items()})
        report["models"][name] = metrics
        report["per_prompt"][name] = per_prompt
    for index in range(min(5, len(prompts))):
        report["samples"].append(
            {
                "prompt": conversations[index].prompt[-1]["content"],
                "teacher": teacher_answers.texts[index],
                **{name: texts[index] for name, texts in responses.items()},
            }
        )
    return report


def _model_for(model, group):
    """A model, or one of several by their teacher's name (the reference row of several teachers)."""
    return model[group] if isinstance(model, dict) else model


@dataclass
class Speaker:
    """A model scored across tokenizers: its own tokenizer and stop tokens, and (read once, when first needed) the
    bytes each of its tokens stands for (gkd/teachers/alignment.py), to give its text to a model of another one."""

    name: str
    model: object
    tokenizer: object
    stop_ids: list[int]

    @cached_property
    def vocabulary(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    @cached_property
    def token_bytes(self) -> list[bytes | None]:
        from gkd.teachers.alignment import token_bytes

        return token_bytes(self.tokenizer, self.name)

    @cached_property
    def byte_ids(self) -> dict[int, int]:
        from gkd.teachers.alignment import byte_token_ids

        return byte_token_ids(self.token_bytes)

    @cached_property
    def end_of_turn(self) -> int:
        """The stop token its chat template writes after an assistant turn (<|im_end|>, <|end|>), else its EOS."""
        from gkd.models import template_end_of_turn

        end = template_end_of_turn(self.tokenizer)
        if end is not None and end in self.stop_ids:
            return end
        eos = self.tokenizer.eos_token_id
        return eos if eos in self.stop_ids else self.stop_ids[0]

    def prompts(self, conversations, max_new_tokens: int) -> list[list[int]]:
        """Every record's prompt, rendered with its own chat template."""
        from gkd.data import encode_conversations

        samples, _ = encode_conversations(conversations, self.tokenizer, 4096, max_new_tokens, self.stop_ids)
        return [sample["prompt_ids"] for sample in samples]

    def suppress_ids(self) -> tuple[int, ...]:
        """Embedding rows beyond its tokenizer: never sampled, as the log-likelihoods are over its tokenizer's ids."""
        return tuple(range(len(self.tokenizer), self.model.get_output_embeddings().weight.shape[0]))

    def writes(self, other: "Speaker", ids: list[int]) -> list[int] | None:
        """`other`'s response (its ids, its stop token last where it stopped) in this model's tokens: the same ids
        where the two share one tokenizer (re-tokenizing could change them: "a" + "b" where the tokenizer writes
        "ab"); else its text, tokenized as a cross-tokenizer teacher is given a completion, with this model's end of
        turn where `other` stopped. None where a byte of it has no token here."""
        if self.vocabulary == other.vocabulary:
            return list(ids)
        from gkd.teachers.alignment import tokenize_bytes

        stopped = bool(ids) and ids[-1] in other.stop_ids
        table = other.token_bytes
        text = b"".join(table[index] or b"" if index < len(table) else b"" for index in ids[:len(ids) - stopped])
        ((tokens, whole),) = tokenize_bytes(self.tokenizer, self.byte_ids, [text])
        if not whole:
            return None
        return tokens + [self.end_of_turn] if stopped else tokens


@torch.no_grad()
def text_teacher_nll(student: Speaker, teacher: Speaker, prompts, teacher_ids: list[list[int]], batch_size) -> dict:
    """Per prompt: the student's summed NLL of the teacher's greedy response written in the student's tokens after
    the student's own prompt, and the teacher's tokens of that response (so with one tokenizer, the per-token
    metric). A response the student cannot write is left out (0 and 0), and counted."""
    written = [student.writes(teacher, ids) for ids in teacher_ids]
    summed = completion_nll(student.model, student.tokenizer, prompts, [ids or [] for ids in written], batch_size)
    return {"teacher_nll": [0.0 if ids is None else value for ids, value in zip(written, summed)],
            "teacher_tokens": [0 if ids is None else len(own) for ids, own in zip(written, teacher_ids)],
            "unwritable_teacher_responses": sum(ids is None for ids in written)}


@torch.no_grad()
def sampled_reverse_kl(student: Speaker, teacher: Speaker, prompts, teacher_prompts, max_new_tokens, batch_size,
                       seed) -> dict:
    """Per prompt, on the student's own sample y at temperature 1: log p_S(y) - log p_T(y), each model after its own
    prompt, y in the teacher's tokens (`Speaker.writes`), and the teacher's token count of y: a sampled estimate of
    the sequence-level reverse KL, per teacher token. A sample the teacher cannot write is left out (0 and 0)."""
    torch.manual_seed(seed)
    samples = generate_responses(student.model, student.tokenizer, prompts, student.stop_ids, max_new_tokens,
                                 batch_size, temperature=1.0, suppress_ids=student.suppress_ids())
    written = [teacher.writes(student, ids) for ids in samples]
    student_nll = completion_nll(student.model, student.tokenizer, prompts, samples, batch_size)
    teacher_side = completion_nll(teacher.model, teacher.tokenizer, teacher_prompts, [ids or [] for ids in written],
                                  batch_size)
    return {"reverse_kl": [0.0 if ids is None else theirs - own
                           for ids, own, theirs in zip(written, student_nll, teacher_side)],
            "sample_tokens": [0 if ids is None else len(ids) for ids in written],
            "unwritable_samples": sum(ids is None for ids in written)}


def evaluate_across_tokenizers(
    students: dict[str, Speaker], teacher: Speaker, conversations, max_new_tokens=48, batch_size=8, seed=0,
    bootstrap_samples=1000, match_case: bool = False,
) -> dict:
    """`evaluate_students` where tokenizers differ: every model answers its own rendering of each prompt with its own
    stop tokens, and the metrics compare text (the module docstring); JSD is not defined (None)."""
    answers = [conversation.answers for conversation in conversations]
    teacher_prompts = teacher.prompts(conversations, max_new_tokens)
    teacher_answers = greedy_responses(teacher.model, teacher.tokenizer, teacher_prompts, teacher.stop_ids,
                                       max_new_tokens, batch_size)
    report = {"num_prompts": len(conversations), "max_new_tokens": max_new_tokens, "seed": seed,
              "bootstrap_samples": bootstrap_samples, "across_tokenizers": True, "models": {}, "per_prompt": {},
              "samples": []}
    responses = {}
    for name, student in tqdm(students.items(), desc="evaluating", unit="model", total=len(students)):
        student.model.eval()
        prompts = student.prompts(conversations, max_new_tokens)
        own = greedy_responses(student.model, student.tokenizer, prompts, student.stop_ids, max_new_tokens,
                               batch_size)
        responses[name] = own.texts
        per_prompt = {
            **sampled_reverse_kl(student, teacher, prompts, teacher_prompts, max_new_tokens, batch_size, seed),
            **text_teacher_nll(student, teacher, prompts, teacher_answers.ids, batch_size),
            "answer_hits": answer_hits(own.texts, answers, match_case),
            "response_tokens": [len(ids) for ids in own.ids],
        }
        unwritable = per_prompt.pop("unwritable_samples") + per_prompt.pop("unwritable_teacher_responses")
        rows = list(range(len(conversations)))
        defined = [metric for metric in RATIOS if metric != "jsd"]
        metrics = {metric: _ratio(per_prompt, metric, rows) if metric in defined else None for metric in RATIOS}
        metrics.update({f"{metric}_ci": bootstrap_interval(per_prompt, metric, bootstrap_samples, seed)
                        if metric in defined else None for metric in RATIOS})
        metrics["mean_response_tokens"] = sum(per_prompt["response_tokens"]) / max(len(conversations), 1)
        metrics["checked_prompts"] = sum(hit is not None for hit in per_prompt["answer_hits"])
        metrics["unwritable_responses"] = unwritable
        report["models"][name] = metrics
        report["per_prompt"][name] = per_prompt
    for index in range(min(5, len(conversations))):
        report["samples"].append({"prompt": conversations[index].prompt[-1]["content"],
                                  "teacher": teacher_answers.texts[index],
                                  **{name: texts[index] for name, texts in responses.items()}})
    return report


def evaluate_folders(
    student_paths: dict, teacher_path, conversations, max_new_tokens=48, batch_size=8, seed=0, bootstrap_samples=1000,
    routes: list[str] | None = None, match_case: bool = False, across_tokenizers: bool = False,
) -> dict:
    """`evaluate_students` for models named by folder or Hub id (a `--use_peft` run's folder counts: its adapter is
    merged into its base): each named student, then the teacher itself as the reference row. `teacher_path` may be a
    dict of several teachers by name, `routes` naming each conversation's. Where a student's tokenizer differs from
    the teacher's (or with `across_tokenizers`, even where none does), every model is scored by text
    (`evaluate_across_tokenizers`)."""
    from gkd import models

    teacher_paths = teacher_path if isinstance(teacher_path, dict) else {None: teacher_path}
    teacher_refs = {name: models.ModelRef(str(path), flag="--teacher" if name is None else f"--teacher {name}")
                    for name, path in teacher_paths.items()}
    for ref in teacher_refs.values():
        models.check_model(ref)
    first = next(iter(teacher_refs.values()))
    tokenizer = models.load_tokenizer(first)
    for name, ref in list(teacher_refs.items())[1:]:
        try:
            models.check_same_vocabulary(models.load_tokenizer(ref), tokenizer, ref.name)
        except GKDError:
            raise ConfigError(f"--teacher {name} ({ref.name}): its tokenizer differs from --teacher "
                              f"{next(iter(teacher_refs))}'s; several teachers are scored on one tokenizer here: "
                              "evaluate against each family in its own gkd-eval run") from None
    student_refs = {name: _student_ref(name, path) for name, path in student_paths.items()}
    student_tokenizers = {name: models.load_tokenizer(ref) for name, ref in student_refs.items()}
    # Prompts are tokenized once, by the teacher, and distributions compared token by token: only where every student
    # has the teacher's token-to-id map (a student with a cut vocabulary, trained with --cross_tokenizer, has not).
    differing = [name for name, student_tokenizer in student_tokenizers.items()
                 if student_tokenizer.get_vocab() != tokenizer.get_vocab()]
    if differing or across_tokenizers:
        why = f"student {', '.join(differing)}: tokenizer differs from the teacher's" if differing else \
            "across_tokenizers"
        if len(teacher_refs) > 1:
            raise ConfigError(f"{why}; gkd-eval scores across tokenizers against one --teacher, not several")
        logger.warning("%s, so every model is scored by text, each answering its own rendering of the prompts: "
                       "teacher_nll and reverse_kl per teacher token, no JSD (docs/cross_tokenizer.md)", why)
        speakers = {name: Speaker(f"--student {name}", None, student_tokenizers[name],
                                  models.stop_token_ids(student_tokenizers[name], student_refs[name]))
                    for name in student_paths}
        teacher = Speaker("--teacher", None, tokenizer, models.stop_token_ids(tokenizer, first))
        for speaker in [teacher, *(speakers[name] for name in differing)]:
            speaker.token_bytes  # a tokenizer that cannot be read as bytes is refused before any weight loads
        for name, path in student_paths.items():
            speakers[name].model = _load_student(name, path)
        teacher.model = models.load_frozen(first, "float32")
        return evaluate_across_tokenizers({**speakers, "teacher": teacher}, teacher, conversations, max_new_tokens,
                                          batch_size, seed, bootstrap_samples, match_case)
    stop_ids = models.stop_token_ids(tokenizer, first)
    # Students are evaluated frozen and in eval mode, exactly as the teacher is loaded.
    students = {name: _load_student(name, path) for name, path in student_paths.items()}
    teachers = {name: models.load_frozen(ref, "float32") for name, ref in teacher_refs.items()}
    teacher = teachers[None] if None in teachers else teachers
    students["teacher"] = teacher
    return evaluate_students(students, teacher, tokenizer, conversations, stop_ids, max_new_tokens, batch_size, seed,
                             bootstrap_samples, routes, match_case)


def _student_ref(name: str, path):
    """The model a student names: its own folder or Hub id, or for a LoRA run's folder, the adapter's base model."""
    from gkd import models
    from gkd.tools.merge import find_adapter, read_adapter_config, resolve_base

    flag = f"--student {name}"
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        adapter_dir = find_adapter(path)
        base, _ = resolve_base(adapter_dir, read_adapter_config(adapter_dir), None)
        ref = models.ModelRef(base, flag=f"{flag} (the base of its adapter)")
    else:
        ref = models.ModelRef(str(path), flag=flag)
    models.check_model(ref)
    return ref


def _load_student(name: str, path):
    """A student model, frozen; a LoRA run's adapter merged into its base (in float32, exactly)."""
    from gkd import models

    model = models.load_frozen(_student_ref(name, path), "float32")
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        model.eval().requires_grad_(False)
    return model


METRICS = [
    ("reverse_kl", "reverse KL (student samples)", "lower"),
    ("jsd", "JSD (student samples)", "lower"),
    ("teacher_nll", "NLL of teacher responses", "lower"),
    ("answer_accuracy", "answer accuracy", "higher"),
    ("mean_response_tokens", "mean response tokens", ""),
]


def markdown_table(report: dict) -> str:
    names = list(report["models"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, better in METRICS:
        cells = []
        for name in names:
            value, interval = report["models"][name].get(key), report["models"][name].get(f"{key}_ci")
            undefined = key == "jsd" and report.get("across_tokenizers")  # no shared vocabulary to compare over
            cell = ("-" if undefined else "n/a") if value is None else _number(value)
            if value is not None and interval and interval[1] - interval[0] > 5e-4:
                cell += f" [{_number(interval[0])}, {_number(interval[1])}]"
            cells.append(cell)
        lines.append(f"| {label}{f' ({better} is better)' if better else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    if any(f"{key}_ci" in metrics for metrics in report["models"].values() for key, _, _ in METRICS):
        lines.append(f"[low, high]: 95% bootstrap interval over the {report['num_prompts']} prompts "
                     f"({report.get('bootstrap_samples', 1000)} resamples).")
        lines.append("")
    if report.get("across_tokenizers"):
        lines.append("Across tokenizers: each model answers its own rendering of the prompts; reverse KL is the "
                     "sampled sequence-level estimate and the NLL is of the teacher's responses as text, both per "
                     "teacher token; JSD is not defined (-).")
        lines.append("")
    for sample in report["samples"]:
        lines.append(f"**{sample['prompt']}**")
        for name, text in sample.items():
            if name != "prompt":
                lines.append(f"- {name}: {text[:200]!r}")
        lines.append("")
    return "\n".join(lines)


def _number(value: float) -> str:
    """Three decimals; divergences are >= 0, and float rounding would print a teacher's own 0 as -0.000."""
    return f"{0.0 if abs(value) < 5e-4 else value:.3f}"


def write_report(report: dict, output_dir: str | Path) -> Path:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(report, indent=2))
    (folder / "eval.md").write_text(markdown_table(report))
    return folder / "eval.md"


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Training curves (loss, its parts, on-policy share, completion length, learning rate) from a run's
    metrics.jsonl; a last line cut short by a crash is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gkd.run_folder import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise GKDError(f"{path}: no metrics.jsonl (is {run_dir} a gkd run's output_dir?)")
    rows = [row for row in read_metrics(run_dir) if "loss" in row and "step" in row]
    if not rows:
        raise GKDError(f"{path}: no training steps logged yet")
    names = ("loss", "kd_loss", "sft_loss", "eval_loss", "completion_tokens", "on_policy", "lmbda", "learning_rate")
    keys = [key for key in names if any(isinstance(row.get(key), (int, float)) for row in rows)]
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        axis.set_title(key)
        axis.set_xlabel("step")
    figure.tight_layout()
    output = Path(output) if output else Path(run_dir) / "curves.png"
    figure.savefig(output, dpi=100)
    return output


@dataclass
class EvaluateConfig:
    """Options of gkd-eval / `python -m gkd.evaluate`."""

    student: list[str] = field(
        default_factory=list,
        metadata={"help": "A student: model folder, Hub id or --use_peft run folder; NAME=PATH names it. Repeat the "
                  "flag (or list several) for more students."},
    )
    teacher: list[str] = field(
        default_factory=list,
        metadata={"help": "The teacher (folder or Hub id); also evaluated, as the reference row. Several, as training "
                  "takes them: NAME=PATH, repeated; each record is scored against the one its `teacher` field names."},
    )
    default_teacher: str | None = field(
        default=None, metadata={"help": "With several --teacher NAME=PATH: the one for records naming none."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Validation records (any format gkd trains on; `answers` optional)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where eval.json and eval.md go."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest response per prompt."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per batch."})
    max_records: int | None = field(default=None, metadata={"help": "Evaluate the first N records only."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampled completions and of the bootstrap."})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Resamples for the 95%% bootstrap intervals."})
    match_case: bool = field(default=False, metadata={
        "help": "An answer counts only as written in `answers` (e.g. in capitals), not in any case."})
    plot_run: str | None = field(
        default=None, metadata={"help": "A run's output_dir: plot its metrics.jsonl to curves.png and exit."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier evaluation in --output_dir."})

    def __post_init__(self):
        if self.plot_run:
            if self.student or self.teacher or self.dataset_name or self.output_dir or self.default_teacher:
                raise ConfigError("--plot_run plots a run's curves and nothing else: give it alone, or evaluate "
                                  "without it")
            return
        if not (self.student and self.teacher and self.dataset_name and self.output_dir):
            raise ConfigError("--student, --teacher, --dataset_name and --output_dir are required (or --plot_run)")
        for name in ("max_new_tokens", "batch_size", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"--max_records must be at least 1, got {self.max_records}")
        self.named_teachers()  # a malformed --teacher is refused before anything loads
        if (Path(self.output_dir) / "eval.json").exists() and not self.overwrite:
            raise ConfigError(f"--output_dir {self.output_dir} already holds an evaluation (eval.json); pass "
                              "--overwrite to replace it, or choose another folder")

    def named_students(self) -> dict[str, str]:
        """NAME -> path; an unnamed student is named after its folder. Two students under one name are refused,
        since one would silently replace the other in the report."""
        named = {}
        for item in self.student:
            name, path = item.split("=", 1) if "=" in item else (Path(item.rstrip("/")).name or item, item)
            if not name.strip() or not path.strip():
                raise ConfigError(f"--student {item}: expected PATH or NAME=PATH")
            if name in named or name == "teacher":
                raise ConfigError(f"--student {item}: the name '{name}' is taken; name each student with NAME=PATH")
            named[name] = path
        return named


    def named_teachers(self) -> str | dict[str, str]:
        """The one teacher's path, or several by name (`--teacher NAME=PATH` each, as gkd-train takes them)."""
        if len(self.teacher) == 1 and "=" not in self.teacher[0]:
            if self.default_teacher is not None:
                raise ConfigError("--default_teacher names one of several teachers: give them as --teacher NAME=PATH")
            return self.teacher[0]
        named = {}
        for item in self.teacher:
            name, _, path = item.partition("=")
            if not name.strip() or not path.strip():
                raise ConfigError(f"--teacher {item}: expected NAME=PATH when there are several teachers")
            if name in named or name == "teacher":
                raise ConfigError(f"--teacher {item}: the name '{name}' is taken; give each teacher its own NAME")
            named[name] = path
        if self.default_teacher is not None and self.default_teacher not in named:
            raise ConfigError(f"--default_teacher {self.default_teacher} is none of the teachers "
                              f"({', '.join(named)})")
        return named


def teacher_routes(conversations, names: list[str], default: str | None) -> list[str]:
    """Each record's teacher: its `teacher` field, or `default` (the only teacher, when one is named). A name no
    --teacher gives, or no name and no default, is refused naming the record."""
    from gkd.errors import DataError

    default = default or (names[0] if len(names) == 1 else None)
    routes = []
    for conversation in conversations:
        route = conversation.teacher or default
        if route is None:
            raise DataError(conversation.source, f"names no teacher, and there is no --default_teacher: add a "
                                                 f"'teacher' field ({', '.join(names)}) or give --default_teacher NAME",
                            field="teacher")
        if route not in names:
            raise DataError(conversation.source, f"names the teacher {route!r}, which no --teacher gives (known: "
                                                 f"{', '.join(names)})", field="teacher")
        routes.append(route)
    return routes


def _merge_repeated(argv: list[str], flag: str) -> list[str]:
    """`--student A --student B` (the README's form) as one list-valued `--student A B`: argparse keeps the last."""
    values, rest, index = [], [], 0
    while index < len(argv):
        if argv[index] == flag:
            index += 1
            while index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
        else:
            rest.append(argv[index])
            index += 1
    return rest + ([flag, *values] if values else [])


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse

    argv = _merge_repeated(_merge_repeated(list(sys.argv[1:] if argv is None else argv), "--student"), "--teacher")
    (config,) = parse(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if config.plot_run:
        print(plot_run(config.plot_run))
        return 0
    from gkd import data
    from gkd.folders import check_output

    named = config.named_students()
    teacher = config.named_teachers()
    teacher_paths = list(teacher.values()) if isinstance(teacher, dict) else [teacher]
    # Written into, never moved aside: it may hold a student (a run's checkpoint, say), but be none and lie in none.
    check_output(config.output_dir, [*named.values(), *teacher_paths, config.dataset_name], replaces=False)
    conversations = data.load_conversations(config.dataset_name)[: config.max_records]
    if any(conversation.is_text for conversation in conversations):
        raise ConfigError(f"{config.dataset_name}: plain-text records have no prompt to answer; evaluate on chat "
                          "records (with `answers` for answer accuracy)")
    routes = teacher_routes(conversations, list(teacher), config.default_teacher) if isinstance(teacher, dict) else None
    report = evaluate_folders(named, teacher, conversations, config.max_new_tokens, config.batch_size,
                              config.seed, config.bootstrap_samples, routes, config.match_case)
    print(markdown_table(report))
    print(f"wrote {write_report(report, config.output_dir)}")
    return 0


if __name__ == "__main__":  # `python -m gkd.tools.evaluate`; `gkd-eval` runs gkd.cli.command
    from gkd.cli import run

    run(main)
