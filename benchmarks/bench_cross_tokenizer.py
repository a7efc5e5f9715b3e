"""What the cross-tokenizer path costs where it is not needed: the same pair trained with and without --cross_tokenizer.

    python -m benchmarks.bench_cross_tokenizer --student ~/.cache/gkd/smollm2-135m-pruned-22l \\
        --teacher ~/.cache/gkd/smollm2-135m-instruct --output_dir runs/bench-cross

A pair that shares a tokenizer trains both ways through gkd/train.py, the runs alternating (same, cross, same, cross,
...) so that a machine's load falls on both alike; each run's seconds per step is its `train_runtime` over its steps.
Both take the teacher's top-K; the cross path also renders the teacher's prompts, re-tokenizes every completion,
aligns the chunks and computes its loss from the student's logits instead of the chunked fused loss.
"""

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CrossBenchArguments:
    student: str = field(metadata={"help": "The student (a folder or Hub id) sharing the teacher's tokenizer."})
    teacher: str = field(metadata={"help": "The teacher."})
    output_dir: str = field(metadata={"help": "Where the runs and results.json go."})
    dataset_name: str = field(default="examples/data/prompts/train.jsonl", metadata={"help": "Training data."})
    repeats: int = field(default=2, metadata={"help": "Runs of each path, alternating."})
    max_steps: int = field(default=4, metadata={"help": "Optimizer steps per run."})
    teacher_top_k: int = field(default=20, metadata={"help": "K of both paths."})
    lmbda: float = field(default=0.5, metadata={"help": "Share of on-policy steps (seed 2 at 0.5: dataset first)."})


def run_once(args: CrossBenchArguments, name: str, repeat: int) -> dict:
    output = Path(args.output_dir) / f"{name}-{repeat}"
    command = [sys.executable, "gkd/train.py", "--model_name_or_path", args.student,
               "--teacher_model_name_or_path", args.teacher, "--dataset_name", args.dataset_name,
               "--output_dir", str(output), "--overwrite_output_dir", "true", "--max_steps", str(args.max_steps),
               "--lmbda", str(args.lmbda), "--seed", "2", "--beta", "0.5", "--teacher_top_k", str(args.teacher_top_k),
               "--per_device_train_batch_size", "8", "--max_new_tokens", "32", "--max_length", "160",
               "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
               *(["--cross_tokenizer"] if name == "cross" else [])]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} run failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    summary = next(line for line in lines if "train_runtime" in line)
    steps = [line for line in lines if "loss" in line]
    return {"seconds_per_step": summary["train_runtime"] / args.max_steps,
            "kd_loss": [step["kd_loss"] for step in steps],
            "aligned_byte_share": [step.get("aligned_byte_share") for step in steps]}


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse

    (args,) = parse(CrossBenchArguments, argv, description=__doc__.splitlines()[0])
    runs = {"same": [], "cross": []}
    for repeat in range(args.repeats):
        for name in runs:
            runs[name].append(run_once(args, name, repeat))
            print(name, repeat, runs[name][-1], flush=True)
    same = statistics.median(run["seconds_per_step"] for run in runs["same"])
    cross = statistics.median(run["seconds_per_step"] for run in runs["cross"])
    report = {"arguments": vars(args), "runs": runs, "median_seconds_per_step": {"same": same, "cross": cross},
              "cross_over_same": cross / same}
    Path(args.output_dir, "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"s/step: same tokenizer {same:.2f}, --cross_tokenizer {cross:.2f} ({cross / same:.2f}x)")
    return 0


if __name__ == "__main__":
    from gkd.cli import run

    run(main)
