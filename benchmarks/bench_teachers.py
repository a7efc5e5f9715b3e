"""Where the teacher's signal comes from, measured side by side: a live teacher, a top-K cache, a served teacher.

    python -m benchmarks.bench_teachers --student S --teacher T --train_data D --output_json teachers.json

1. Builds top-K caches of the teacher over the data (`gkd-cache-teacher`, K = each of --cache_k), timing the build and
   counting bytes per cached token.
2. Trains the same student for the same steps from each source, one fresh process each, on dataset steps
   (`--lmbda 0`, forward KL; `--lmbda 1` for on-policy steps, caches skipped): the live teacher (full distribution, and its top-K), each cache, and the shipped server
   (`gkd-teacher-serve`, started here on the same machine, so on CPU the server and the training share the cores).
   Step time is the run's `train_runtime` over its steps; peak memory is the training process's resident high-water
   mark (VmHWM: Python, libraries, models, data), the server's excluded.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.profiling import run_command

REPO = Path(__file__).resolve().parent.parent


@dataclass
class TeacherBenchArguments:
    student: str = field(metadata={"help": "The student folder."})
    teacher: str = field(metadata={"help": "The teacher folder."})
    train_data: str = field(default=str(REPO / "examples/data/prompts/train.jsonl"))
    steps: int = field(default=12, metadata={"help": "Optimizer steps per run."})
    batch_size: int = field(default=8)
    max_length: int = field(default=160)
    max_new_tokens: int = field(default=32)
    cache_k: list[int] = field(default_factory=lambda: [20, 100])
    server_k: int = field(default=20, metadata={"help": "K asked of the served teacher (0 skips the server)."})
    lmbda: float = field(default=0.0, metadata={"help": "Share of on-policy steps; above 0 the caches are skipped "
                                                        "(a cache cannot score the student's samples)."})
    work_dir: str | None = field(default=None)
    output_json: str | None = field(default=None)


def train(args: TeacherBenchArguments, name: str, teacher_flags: list[str], work: Path, env: dict) -> dict:
    output_dir = work / f"run-{name}"
    subprocess.run(["rm", "-rf", str(output_dir)])
    command = [sys.executable, str(REPO / "gkd/train.py"), "--model_name_or_path", args.student, *teacher_flags,
               "--dataset_name", args.train_data, "--output_dir", str(output_dir), "--max_steps", str(args.steps),
               "--per_device_train_batch_size", str(args.batch_size), "--max_length", str(args.max_length),
               "--max_new_tokens", str(args.max_new_tokens), "--lmbda", str(args.lmbda), "--beta", "0", "--logging_steps", "1",
               "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    result = run_command(command, REPO, env)
    runtime = float(re.findall(r"'train_runtime': '([\d.]+)'", result["output"])[-1])
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    teacher_wait = [line["teacher_seconds"] for line in steps if "teacher_seconds" in line]
    report = {"step_seconds": runtime / args.steps, "peak_rss_gib": result["peak_rss_gib"],
              "process_seconds": result["seconds"], "final_loss": steps[-1]["loss"],
              "teacher_wait_seconds_per_step": sum(teacher_wait) / len(teacher_wait) if teacher_wait else None}
    print(f"{name:14s} {report['step_seconds']:.2f} s/step, peak {report['peak_rss_gib']:.2f} GiB"
          + (f", waiting for the teacher {report['teacher_wait_seconds_per_step']:.2f} s/step" if teacher_wait else ""),
          flush=True)
    return report


def build_cache(args: TeacherBenchArguments, k: int, work: Path, env: dict) -> dict:
    folder = work / f"cache-k{k}"
    subprocess.run(["rm", "-rf", str(folder)])
    command = [sys.executable, "-m", "gkd.tools.cache_teacher", "--teacher_model_name_or_path", args.teacher,
               "--tokenizer_name_or_path", args.student, "--dataset_name", args.train_data, "--top_k", str(k),
               "--output_dir", str(folder), "--max_length", str(args.max_length), "--max_new_tokens",
               str(args.max_new_tokens)]
    result = run_command(command, REPO, env)
    manifest = json.loads((folder / "cache.json").read_text())
    report = {"folder": str(folder), "build_seconds": result["seconds"], "tokens": manifest["tokens"],
              "bytes": manifest["bytes"], "bytes_per_token": manifest["bytes"] / manifest["tokens"]}
    print(f"cache K={k}: built in {report['build_seconds']:.0f} s, {report['tokens']} tokens, "
          f"{report['bytes_per_token']:.0f} bytes per token", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse

    (args,) = parse(TeacherBenchArguments, argv, description=__doc__.splitlines()[0])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gkd-bench-teachers-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "datasets-cache")}
    report = {"options": asdict(args), "cpus": os.cpu_count(), "caches": {}, "runs": {}}
    if args.lmbda > 0:
        args.cache_k = []
    for k in args.cache_k:
        report["caches"][f"k{k}"] = build_cache(args, k, work, env)
    report["runs"]["live"] = train(args, "live", ["--teacher_model_name_or_path", args.teacher], work, env)
    for k in args.cache_k:
        report["runs"][f"live_top{k}"] = train(args, f"live_top{k}", ["--teacher_model_name_or_path", args.teacher,
                                                                     "--teacher_top_k", str(k)], work, env)
        report["runs"][f"cache_k{k}"] = train(args, f"cache_k{k}", ["--teacher_logits_path",
                                                                    report["caches"][f"k{k}"]["folder"]], work, env)
    if args.server_k:
        server = subprocess.Popen([sys.executable, "-m", "gkd.tools.teacher_server", "--model_name_or_path",
                                   args.teacher, "--port", "0", "--max_logprobs", str(args.server_k)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = re.search(r"(http://[\d.]+:\d+)", server.stdout.readline()).group(1)
            report["runs"][f"server_k{args.server_k}"] = train(
                args, f"server_k{args.server_k}", ["--teacher_server_url", url, "--teacher_top_k", str(args.server_k)],
                work, env)
        finally:
            server.kill()
            server.communicate()
    live = report["runs"]["live"]
    for name, run in report["runs"].items():
        run["step_time_vs_live"] = run["step_seconds"] / live["step_seconds"]
        run["peak_vs_live_gib"] = run["peak_rss_gib"] - live["peak_rss_gib"]
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from gkd.cli import run

    run(main)
