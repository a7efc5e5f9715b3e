"""Issue #26: two teachers that really differ, and a student routed between them (docs/results.md, "Several teachers").

    python examples/studies/two_teachers.py [--cache_dir ~/.cache/gkd] [--output_dir runs/two_teachers]

The demo's teacher (SmolLM2-135M-Instruct) and 22-block student (`make demo` caches both), on CPU:

1. data: the demo's prompts (examples/data/prompts) twice: as they are ("plain") and with the skill "shout": the
   question prefixed "SHOUT: " and the reply in capitals ("SUNDAY COMES BEFORE MONDAY."), accepted answers in capitals
   too. The validation facts (the 50 of the demo's 60 that carry answers) are disjoint from the training facts. The distillation data mixes
   both training sets (1200 records), each record naming its teacher (`teacher`: plain or skill).
2. skill teacher: a copy of the teacher fine-tuned (`gkd/train.py --objective sft`, 40 steps of 8, lr 2e-4) on 300 shout
   records (every other training fact) and 150 plain ones (so that it answers plain prompts in plain case), with the
   reference replies.
3. distill: three runs of the demo's settings (examples/demo.yaml) on the mixed data, one after the other: routed
   (`--teacher plain=T --teacher skill=T_SKILL`), plain only (every record from T) and skill only (from T_SKILL).
4. evaluate: `gkd-eval` on each validation set against that set's own teacher, with the three students and the
   other teacher as rows; shout answers must appear in capitals (`--match_case`). 95% bootstrap
   intervals over prompts, and the routed student's paired differences to the two single-teacher students, go to
   OUTPUT_DIR/results.md.

Each stage reuses what an earlier invocation finished (delete a folder to redo it).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "examples/data/prompts"
SKILL_PREFIX = "SHOUT: "
SETS = ("plain", "shout")  # validation prompt sets; the shout set is the skill teacher's
STUDENTS = ("routed", "plain_only", "skill_only")
SFT_OPTIONS = ["--objective", "sft", "--max_steps", "40", "--per_device_train_batch_size", "8",
               "--learning_rate", "2e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "3",
               "--max_length", "192", "--logging_steps", "5", "--save_strategy", "no", "--seed", "0"]
EVAL_OPTIONS = ["--max_new_tokens", "32", "--batch_size", "8", "--seed", "0", "--bootstrap_samples", "1000"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def shout(record: dict) -> dict:
    """The record with the skill: the question prefixed, the reply and the accepted answers in capitals."""
    question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
    shouted = {"messages": [{"role": "user", "content": SKILL_PREFIX + question},
                            {"role": "assistant", "content": answer.upper()}]}
    if record.get("answers"):
        shouted["answers"] = [option.upper() for option in record["answers"]]
    return shouted


def build_data(data_dir: Path) -> dict[str, Path]:
    """The prompt sets: mixed distillation data, the skill teacher's fine-tuning data, and both validation sets."""
    paths = {name: data_dir / f"{name}.jsonl" for name in ("mixed_train", "skill_sft", "plain_val", "shout_val")}
    train, val = read_jsonl(PROMPTS / "train.jsonl"), read_jsonl(PROMPTS / "val.jsonl")
    write_jsonl(paths["mixed_train"], [{**record, "teacher": "plain"} for record in train]
                + [{**shout(record), "teacher": "skill"} for record in train])
    val = [record for record in val if record.get("answers")]  # the 50 checkable ones: accuracy and KL on the same
    write_jsonl(paths["plain_val"], val)
    write_jsonl(paths["shout_val"], [shout(record) for record in val])
    # Every other training fact shouted, and half as many plain, with the reference replies: the plain ones keep
    # "no prefix, no capitals" in the fine-tuned teacher (they also teach it the reference's short replies).
    write_jsonl(paths["skill_sft"], [shout(record) for record in train[::2]] + train[1::4])
    return paths


def run_logged(command: list[str], name: str, log: Path) -> None:
    """One command in a subprocess, its output appended to `log`; a failure stops the study naming the stage."""
    print("$ " + " ".join(command), flush=True)
    started = time.time()
    with log.open("a") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}); see {log}")
    print(f"  {name}: {time.time() - started:.0f} s", flush=True)


def train(command: list[str], output_dir: Path, log: Path) -> None:
    """One gkd/train.py run in a subprocess, reused when its folder holds a finished model."""
    if (output_dir / "model.safetensors").exists():
        print(f"reusing {output_dir}", flush=True)
        return
    run_logged([sys.executable, str(REPO / "gkd/train.py"), *command, "--output_dir", str(output_dir),
                "--disable_tqdm", "true"], output_dir.name, log)


def evaluate(rows: dict[str, Path], teacher: Path, data: Path, output_dir: Path, log: Path, extra: list[str]) -> dict:
    """`gkd-eval` of the named rows against `teacher` on `data`; its eval.json (reused when present)."""
    if not (output_dir / "eval.json").exists():
        run_logged([sys.executable, "-m", "gkd.tools.evaluate", "--teacher", str(teacher), "--dataset_name", str(data),
                    "--output_dir", str(output_dir), *EVAL_OPTIONS, *extra, "--student",
                    *(f"{name}={path}" for name, path in rows.items())], f"evaluation {output_dir.name}", log)
    return json.loads((output_dir / "eval.json").read_text())


def results_table(reports: dict[str, dict]) -> str:
    """Answer accuracy and reverse KL to the set's own teacher, per row and set, with 95% intervals; then the routed
    student's paired differences to each single-teacher student."""
    from gkd.tools.evaluate import paired_difference

    def cell(metrics: dict, metric: str) -> str:
        low, high = metrics[f"{metric}_ci"]
        return f"{metrics[metric]:.3f} [{low:.3f}, {high:.3f}]"

    rows = list(dict.fromkeys(name for report in reports.values() for name in report["models"] if name != "teacher"))
    lines = ["| model | " + " | ".join(f"{s}: accuracy | {s}: reverse KL" for s in reports) + " |",
             "|---|" + "---|---|" * len(reports)]
    for name in [*rows, "teacher"]:
        cells = []
        for report in reports.values():
            metrics = report["models"].get(name)
            cells += [cell(metrics, "answer_accuracy"), cell(metrics, "reverse_kl")] if metrics else ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| routed minus | " + " | ".join(f"{s}: accuracy | {s}: reverse KL" for s in reports) + " |",
              "|---|" + "---|---|" * len(reports)]
    for other in ("plain_only", "skill_only"):
        cells = []
        for report in reports.values():
            for metric in ("answer_accuracy", "reverse_kl"):
                value, (low, high) = paired_difference(report, "routed", other, metric, report["bootstrap_samples"],
                                                       report["seed"])
                cells.append(f"{value:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default="~/.cache/gkd", help="Where `make demo` cached teacher and student.")
    parser.add_argument("--output_dir", default="runs/two_teachers")
    parser.add_argument("--eval_records", type=int, default=50, help="Validation prompts per set (50: all).")
    args = parser.parse_args()
    cache_dir = Path(args.cache_dir).expanduser()
    teacher, student = cache_dir / "smollm2-135m-instruct", cache_dir / "smollm2-135m-pruned-22l"
    for path in (teacher, student):
        if not (path / "config.json").exists():
            raise SystemExit(f"{path}: missing; run `make demo` first (it caches the teacher and the student)")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"

    data = build_data(out / "data")
    skill_teacher = out / "teacher_skill"
    train(["--model_name_or_path", str(teacher), "--teacher_model_name_or_path", str(teacher),
           "--dataset_name", str(data["skill_sft"]), *SFT_OPTIONS], skill_teacher, log)

    demo = ["--config", str(REPO / "examples/demo.yaml"), "--model_name_or_path", str(student),
            "--dataset_name", str(data["mixed_train"])]
    teachers = {"routed": ["--teacher", f"plain={teacher}", "--teacher", f"skill={skill_teacher}"],
                "plain_only": ["--teacher_model_name_or_path", str(teacher)],
                "skill_only": ["--teacher_model_name_or_path", str(skill_teacher)]}
    for name in STUDENTS:
        train([*demo, *teachers[name]], out / name, log)

    students = {name: out / name for name in STUDENTS}
    records = ["--max_records", str(args.eval_records)]
    reports = {
        "plain": evaluate({**students, "skill_teacher": skill_teacher}, teacher, data["plain_val"], out / "eval_plain",
                          log, records),
        "shout": evaluate({**students, "plain_teacher": teacher}, skill_teacher, data["shout_val"], out / "eval_shout",
                          log, [*records, "--match_case", "true"]),
    }
    table = results_table(reports)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
