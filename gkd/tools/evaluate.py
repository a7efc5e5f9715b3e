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
"""

import json
import logging
import random
import sys
from dataclasses import dataclass, field
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
    from gkd.generation import generate
    from gkd.sampling import Sampling

    ids, texts = [], []
    for chunk in _batches(prompts, batch_size):
        batch = pad_batch([{"prompt_ids": p, "completion_ids": []} for p in chunk], tokenizer.pad_token_id)
        completion, mask = generate(model, batch["prompt_ids"], batch["prompt_mask"], Sampling(
            max_new_tokens, stop_ids, tokenizer.pad_token_id, temperature=None))
        for row, row_mask in zip(completion, mask):
            tokens = row[row_mask.bool()].tolist()
            ids.append(tokens)
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return Responses(ids, texts)


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
    per_prompt = {"teacher_nll": [], "teacher_tokens": []}
    samples = [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompts, teacher_answers.ids)]
    for chunk in _batches(samples, batch_size):
        batch = pad_batch(chunk, tokenizer.pad_token_id)
        logits = _completion_logits(
            student, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
        )
        logits = logits[..., : len(tokenizer)] if logits.shape[-1] > len(tokenizer) else logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["completion_ids"], reduction="none")
        kept = batch["completion_mask"].bool()
        per_prompt["teacher_nll"] += torch.where(kept, nll, 0.0).sum(dim=1).tolist()
        per_prompt["teacher_tokens"] += kept.sum(dim=1).tolist()
    return per_prompt


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


def evaluate_folders(
    student_paths: dict, teacher_path, conversations, max_new_tokens=48, batch_size=8, seed=0, bootstrap_samples=1000,
    routes: list[str] | None = None, match_case: bool = False,
) -> dict:
    """`evaluate_students` for models named by folder or Hub id (a `--use_peft` run's folder counts: its adapter is
    merged into its base): each named student, then the teacher itself as the reference row. `teacher_path` may be a
    dict of several teachers by name, `routes` naming each conversation's."""
    from gkd import models

    teacher_paths = teacher_path if isinstance(teacher_path, dict) else {None: teacher_path}
    teacher_refs = {name: models.ModelRef(str(path), flag="--teacher" if name is None else f"--teacher {name}")
                    for name, path in teacher_paths.items()}
    for ref in teacher_refs.values():
        models.check_model(ref)
    first = next(iter(teacher_refs.values()))
    tokenizer = models.load_tokenizer(first)
    for name, ref in list(teacher_refs.items())[1:]:
        models.check_same_vocabulary(models.load_tokenizer(ref), tokenizer, f"teacher {name} ({ref.name})")
    for name, path in student_paths.items():
        student_ref = _student_ref(name, path)
        student_tokenizer = models.load_tokenizer(student_ref)
        models.check_same_vocabulary(student_tokenizer, tokenizer, f"student {name} ({path})")
        # and the other way: prompts are tokenized once, by the teacher, so a student must know every teacher token
        # (one with a cut vocabulary, trained with --cross_tokenizer, would index past its embedding)
        models.check_same_vocabulary(tokenizer, student_tokenizer, f"student {name} ({path})")
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
            cell = "n/a" if value is None else _number(value)
            if value is not None and interval and interval[1] - interval[0] > 5e-4:
                cell += f" [{_number(interval[0])}, {_number(interval[1])}]"
            cells.append(cell)
        lines.append(f"| {label}{f' ({better} is better)' if better else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    if any(f"{key}_ci" in metrics for metrics in report["models"].values() for key, _, _ in METRICS):
        lines.append(f"[low, high]: 95% bootstrap interval over the {report['num_prompts']} prompts "
                     f"({report.get('bootstrap_samples', 1000)} resamples).")
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
