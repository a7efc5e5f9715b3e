"""How close is a student to its teacher? Metrics on a validation set, as JSON and a Markdown table; curves as PNG.

    python -m gkd.evaluate --student S [--student S2 ...] --teacher T --dataset_name val.jsonl --output_dir O
    python -m gkd.evaluate --plot_run runs/x          # training curves from runs/x/metrics.jsonl -> PNG

Metrics, per student:
- reverse_kl, jsd: per-token divergence from the teacher on completions the student samples itself (temperature 1):
  what on-policy distillation minimises.
- teacher_nll: per-token negative log-likelihood of the teacher's greedy responses under the student.
- answer_accuracy: share of records with `answers` whose greedy response contains one (case-insensitive).
- mean_response_tokens: length of the student's greedy responses.
"""

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from tqdm.auto import tqdm

from gkd import losses
from gkd.batching import pad_batch
from gkd.cli import run
from gkd.errors import GKDError

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

    ids, texts = [], []
    for chunk in _batches(prompts, batch_size):
        batch = pad_batch([{"prompt_ids": p, "completion_ids": []} for p in chunk], tokenizer.pad_token_id)
        completion, mask = generate(
            model, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=max_new_tokens,
            stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, temperature=None,
        )
        for row, row_mask in zip(completion, mask):
            tokens = row[row_mask.bool()].tolist()
            ids.append(tokens)
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return Responses(ids, texts)


@torch.no_grad()
def _completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion_ids.shape[1] + 1).logits
    return logits[:, :-1].float()


@torch.no_grad()
def divergences(student, teacher, tokenizer, prompts, stop_ids, max_new_tokens, batch_size, seed) -> dict:
    """Per-token reverse KL and JSD on the student's own samples at temperature 1."""
    from gkd.generation import generate

    torch.manual_seed(seed)
    totals = {"reverse_kl": 0.0, "jsd": 0.0}
    tokens = 0
    for chunk in _batches(prompts, batch_size):
        batch = pad_batch([{"prompt_ids": p, "completion_ids": []} for p in chunk], tokenizer.pad_token_id)
        completion, mask = generate(
            student, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=max_new_tokens,
            stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, temperature=1.0,
        )
        args = (batch["prompt_ids"], batch["prompt_mask"], completion, mask)
        student_logits, teacher_logits = losses.align_vocab(
            _completion_logits(student, *args), _completion_logits(teacher, *args)
        )
        totals["reverse_kl"] += losses.masked_sum(losses.generalized_jsd(student_logits, teacher_logits, 1.0), mask).item()
        totals["jsd"] += losses.masked_sum(losses.generalized_jsd(student_logits, teacher_logits, 0.5), mask).item()
        tokens += int(mask.sum())
    return {name: value / max(tokens, 1) for name, value in totals.items()}


@torch.no_grad()
def teacher_nll(student, tokenizer, prompts, teacher_answers: Responses, batch_size) -> float:
    total, tokens = 0.0, 0
    samples = [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompts, teacher_answers.ids)]
    for chunk in _batches(samples, batch_size):
        batch = pad_batch(chunk, tokenizer.pad_token_id)
        logits = _completion_logits(
            student, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
        )
        logits = logits[..., : len(tokenizer)] if logits.shape[-1] > len(tokenizer) else logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["completion_ids"], reduction="none")
        total += losses.masked_sum(nll, batch["completion_mask"]).item()
        tokens += int(batch["completion_mask"].sum())
    return total / max(tokens, 1)


def answer_accuracy(texts: list[str], answers: list[list[str] | None]) -> float | None:
    checked = [(text, options) for text, options in zip(texts, answers) if options]
    if not checked:
        return None
    hits = sum(any(option.lower() in text.lower() for option in options) for text, options in checked)
    return hits / len(checked)


def evaluate_students(
    students: dict, teacher, tokenizer, conversations, stop_ids, max_new_tokens=48, batch_size=8, seed=0
) -> dict:
    """Metrics for each named student against one teacher; the teacher's greedy responses are computed once."""
    from gkd.data import encode_conversations

    samples, _ = encode_conversations(conversations, tokenizer, 4096, max_new_tokens, stop_ids)
    prompts = [sample["prompt_ids"] for sample in samples]
    answers = [conversation.answers for conversation in conversations]
    teacher_answers = greedy_responses(teacher, tokenizer, prompts, stop_ids, max_new_tokens, batch_size)
    report = {"num_prompts": len(prompts), "max_new_tokens": max_new_tokens, "models": {}, "samples": []}
    responses = {}
    for name, student in tqdm(students.items(), desc="evaluating", unit="model", total=len(students)):
        student.eval()
        own = greedy_responses(student, tokenizer, prompts, stop_ids, max_new_tokens, batch_size)
        responses[name] = own.texts
        report["models"][name] = {
            **divergences(student, teacher, tokenizer, prompts, stop_ids, max_new_tokens, batch_size, seed),
            "teacher_nll": teacher_nll(student, tokenizer, prompts, teacher_answers, batch_size),
            "answer_accuracy": answer_accuracy(own.texts, answers),
            "mean_response_tokens": sum(len(ids) for ids in own.ids) / max(len(own.ids), 1),
        }
    for index in range(min(5, len(prompts))):
        report["samples"].append(
            {
                "prompt": conversations[index].prompt[-1]["content"],
                "teacher": teacher_answers.texts[index],
                **{name: texts[index] for name, texts in responses.items()},
            }
        )
    return report


def evaluate_folders(
    student_paths: dict, teacher_path, conversations, max_new_tokens=48, batch_size=8, seed=0
) -> dict:
    """`evaluate_students` for model folders: each named student, then the teacher itself as the reference row."""
    from gkd import models

    teacher_path = str(teacher_path)
    for path in student_paths.values():
        models.check_same_vocabulary(str(path), teacher_path)
    tokenizer = models.load_tokenizer(teacher_path)
    stop_ids = models.stop_token_ids(tokenizer, teacher_path)
    # Students are evaluated frozen and in eval mode, exactly as the teacher is loaded.
    students = {name: models.load_teacher(str(path), "float32", False, None) for name, path in student_paths.items()}
    teacher = models.load_teacher(teacher_path, "float32", False, None)
    students["teacher"] = teacher
    return evaluate_students(students, teacher, tokenizer, conversations, stop_ids, max_new_tokens, batch_size, seed)


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
            value = report["models"][name].get(key)
            # Divergences are >= 0; float rounding can print a teacher's own 0 as -0.000.
            cells.append("n/a" if value is None else f"{0.0 if abs(value) < 5e-4 else value:.3f}")
        lines.append(f"| {label}{f' ({better} is better)' if better else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    for sample in report["samples"]:
        lines.append(f"**{sample['prompt']}**")
        for name, text in sample.items():
            if name != "prompt":
                lines.append(f"- {name}: {text[:200]!r}")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, output_dir: str | Path) -> Path:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(report, indent=2))
    (folder / "eval.md").write_text(markdown_table(report))
    return folder / "eval.md"


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Training curves (loss, on-policy share, completion length, learning rate) from a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise GKDError(f"{path}: no metrics.jsonl (is {run_dir} a gkd run's output_dir?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "loss" in row]
    keys = [k for k in ("loss", "eval_loss", "completion_tokens", "on_policy", "learning_rate") if any(k in r for r in rows)]
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in rows if key in row]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        axis.set_title(key)
        axis.set_xlabel("step")
    figure.tight_layout()
    output = Path(output) if output else Path(run_dir) / "curves.png"
    figure.savefig(output, dpi=100)
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", action="append", default=[], help="Student folder (repeatable); NAME=PATH names it.")
    parser.add_argument("--teacher", help="Teacher folder; also evaluated as a student, as the reference row.")
    parser.add_argument("--dataset_name", help="Validation records (any format gkd trains on; `answers` optional).")
    parser.add_argument("--output_dir", help="Where eval.json and eval.md go.")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_records", type=int, default=None, help="Evaluate the first N records only.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot_run", help="A run's output_dir: plot its metrics.jsonl to curves.png and exit.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.plot_run:
        print(plot_run(args.plot_run))
        return
    if not (args.student and args.teacher and args.dataset_name and args.output_dir):
        parser.error("--student, --teacher, --dataset_name and --output_dir are required (or --plot_run)")

    from gkd import data

    conversations = data.load_conversations(args.dataset_name)[: args.max_records]
    named = dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in args.student)
    for path in list(named.values()) + [args.teacher]:
        if not Path(path).is_dir():
            raise GKDError(f"no model folder at {path}")
    report = evaluate_folders(named, args.teacher, conversations, args.max_new_tokens, args.batch_size, args.seed)
    print(markdown_table(report))
    print(f"wrote {write_report(report, args.output_dir)}")


if __name__ == "__main__":
    run(main)
