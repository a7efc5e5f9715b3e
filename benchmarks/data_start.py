"""Time to the first training step, and peak memory, on a large chat dataset: cold (nothing encoded yet) and warm
(the encoded data cached by an earlier run), against a checkout of gkd as it was before the data pipeline.

    python -m benchmarks.data_start --records 200000 --output_json data_start.json [--before_repo /path/to/old/gkd]

Every run is the real CLI (`gkd/train.py`) on tiny random models (benchmarks/tiny_models.py), one optimizer step,
so the time is start-up: imports, reading and encoding the data, loading the models, and the step. Each run is a fresh
process; its peak resident memory is the child's `ru_maxrss`. The records are synthetic chat conversations of varied
length.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.profiling import run_command

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over the lazy dog what is capital of france paris two plus four name a colour "
         "red green blue animal cat dog cow horse you are helpful assistant answer question briefly").split()


@dataclass
class DataStartArguments:
    records: int = field(default=200_000, metadata={"help": "Synthetic chat records in the JSONL file."})
    before_repo: str | None = field(default=None, metadata={"help": "A checkout of gkd to compare with."})
    num_proc: int = field(default=1, metadata={"help": "--dataset_num_proc of the runs (the current gkd only)."})
    max_length: int = field(default=128, metadata={"help": "--max_length of the runs: at 128 most synthetic prompts "
                                                           "are cut to fit, at 512 none are."})
    output_json: str | None = field(default=None)
    work_dir: str | None = field(default=None, metadata={"help": "Where data, models and caches go (a temp dir)."})


def write_records(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "?"
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + "."
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def time_to_first_step(repo: Path, models: Path, data: Path, output_dir: Path, env: dict, extra=(),
                       max_length: int = 128) -> dict:
    """Seconds from launch to the first logged step, and the child's peak resident memory."""
    command = [sys.executable, str(repo / "gkd/train.py"), "--model_name_or_path", str(models / "student"),
               "--teacher_model_name_or_path", str(models / "teacher"), "--dataset_name", str(data),
               "--output_dir", str(output_dir), "--max_steps", "1", "--logging_steps", "1", "--save_strategy", "no",
               "--report_to", "none", "--per_device_train_batch_size", "2", "--max_new_tokens", "8",
               "--max_length", str(max_length), "--lmbda", "0", "--disable_tqdm", "true", *extra]
    result = run_command(command, repo, env, first_line_marker="'loss'")
    return {"first_step_seconds": result["first_marker_seconds"], "total_seconds": result["seconds"],
            "peak_rss_gib": result["peak_rss_gib"]}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.tiny_models import make_student_and_teacher
    from gkd.cli import parse

    (args,) = parse(DataStartArguments, argv, description=__doc__.splitlines()[0])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gkd-data-start-"))

    models = work / "models"
    if not (models / "student").exists():
        make_student_and_teacher(models)
    data = work / f"chat-{args.records}.jsonl"
    if not data.exists():
        write_records(data, args.records)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    results = {"records": args.records, "data_bytes": data.stat().st_size, "cpus": os.cpu_count(), "runs": {}}
    variants = [("after", REPO, ["--dataset_num_proc", str(args.num_proc)])]
    if args.before_repo:
        variants.insert(0, ("before", Path(args.before_repo), []))
    for name, repo, extra in variants:
        cache = work / f"datasets-cache-{name}-{args.max_length}"
        run_env = {**env, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(repo)}
        for attempt in ("cold", "warm"):
            output_dir = work / f"run-{name}-{attempt}"
            result = time_to_first_step(repo, models, data, output_dir, run_env, extra, args.max_length)
            results["runs"][f"{name}/{attempt}"] = result
            print(f"{name:6s} {attempt}: first step after {result['first_step_seconds']:.1f} s, peak "
                  f"{result['peak_rss_gib']:.2f} GiB", flush=True)
            subprocess.run(["rm", "-rf", str(output_dir)])
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"options": asdict(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    from gkd.cli import run

    run(main)
