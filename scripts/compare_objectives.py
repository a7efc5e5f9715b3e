"""Same student, teacher, prompts, steps and seed, several objectives: which one brings the student closest?

    python scripts/compare_objectives.py --student S --teacher T --output_dir runs/compare \
        [--train_data examples/data/prompts/train.jsonl] [--val_data examples/data/prompts/val.jsonl] \
        [--runs sft,supervised_kd,...] [any gkd/train.py option, e.g. --max_steps 100 --learning_rate 1e-4]

The objectives (the GKD paper's comparison, Agarwal et al. 2024):
- sft: cross-entropy on responses the teacher samples (sequence-level KD)
- supervised_kd: forward KL to the teacher on the dataset's responses (lmbda 0)
- gkd_l{0.5,1}_b{0,0.5,1}: GKD with half / all steps on-policy, forward KL, JSD, reverse KL

Each run is the real CLI (`gkd/train.py`) in a subprocess; then every student is evaluated on the same validation
prompts against the same teacher (`gkd.evaluate`). Writes OUTPUT_DIR/results.md, results.json and compare.png.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gkd.cli import run
from gkd.errors import GKDError

REPO = Path(__file__).resolve().parent.parent

OBJECTIVES = {
    "sft": ["--objective", "sft", "--seq_kd", "True", "--lmbda", "0"],
    "supervised_kd": ["--lmbda", "0", "--beta", "0"],
    **{
        f"gkd_l{lmbda}_b{beta}": ["--lmbda", str(lmbda), "--beta", str(beta)]
        for lmbda in (0.5, 1)
        for beta in (0, 0.5, 1)
    },
}


def train(name: str, args, train_overrides: list[str]) -> tuple[Path, float]:
    output_dir = Path(args.output_dir) / name
    command = [
        sys.executable, str(REPO / "gkd/train.py"),
        "--model_name_or_path", args.student, "--teacher_model_name_or_path", args.teacher,
        "--dataset_name", args.train_data, "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--save_strategy", "no", "--seed", str(args.seed), "--report_to", "none",
        *OBJECTIVES[name], *train_overrides,
    ]
    print(f"== {name}: {' '.join(command[2:])}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        raise GKDError(f"run {name} failed with exit code {result.returncode}")
    return output_dir, time.time() - started


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gkd.tools.evaluate import METRICS

    names = list(report["models"])
    keys = [(key, label) for key, label, _ in METRICS[:4]]
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4))
    for axis, (key, label) in zip(axes, keys):
        values = [report["models"][name].get(key) or 0.0 for name in names]
        axis.bar(range(len(names)), values)
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        axis.set_title(label)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="The student every objective starts from.")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_data", default=str(REPO / "examples/data/prompts/train.jsonl"))
    parser.add_argument("--val_data", default=str(REPO / "examples/data/prompts/val.jsonl"))
    parser.add_argument("--runs", default=",".join(OBJECTIVES), help=f"Comma-separated subset of {list(OBJECTIVES)}.")
    parser.add_argument("--eval_records", type=int, default=60)
    parser.add_argument("--eval_max_new_tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args, train_overrides = parser.parse_known_args()
    runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in runs if name not in OBJECTIVES]
    if unknown:
        raise GKDError(f"--runs: unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")
    for flag, path in (("--student", args.student), ("--teacher", args.teacher)):
        if not Path(path).is_dir():
            raise GKDError(f"{flag}: no model folder at {path}")

    from gkd import data
    from gkd.tools.evaluate import evaluate_folders, markdown_table

    conversations = data.load_conversations(args.val_data)[: args.eval_records]  # validate before training
    trained, seconds = {}, {}
    for name in runs:
        trained[name], seconds[name] = train(name, args, train_overrides)

    report = evaluate_folders(
        {"start": args.student, **trained}, args.teacher, conversations, args.eval_max_new_tokens, seed=args.seed
    )
    report["train_seconds"] = seconds
    report["command"] = sys.argv
    output_dir = Path(args.output_dir)
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (output_dir / "results.md").write_text(f"Command: `{' '.join(sys.argv)}`\n\n{table}\n")
    plot(report, output_dir / "compare.png")
    print(table)
    print(f"wrote {output_dir / 'results.md'} and {output_dir / 'compare.png'}")


if __name__ == "__main__":
    run(main)
