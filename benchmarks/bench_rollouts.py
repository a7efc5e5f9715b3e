"""The student's on-policy samples from a rollout server against sampling in the training process, side by side.

    python -m benchmarks.bench_rollouts --student S --teacher T --output_json rollouts.json

Starts the shipped server (`gkd-teacher-serve --enable_lora`) on the student's base model, on this machine, then
trains the same LoRA student from the same live teacher for the same on-policy steps (`--use_peft --lmbda 1`), each
run a fresh process: `local` (the student samples in the training process, gkd's default backend) and `served`
(`--rollout_server_url`: the adapter saved, loaded into the server, the completions sampled there over HTTP). Runs
alternate local, served, served, local, ... for `--rounds` rounds, so a machine load that changes over time falls on
both alike. On CPU the server and the training share the cores.

Step time: the wall time between consecutive step log lines (`--logging_steps 1`), the first step of each run (loading,
first allocations) left out. The served runs' per-step costs are the means of what gkd logs each step into
metrics.jsonl over the same steps: `rollout_save_seconds` (peft's `save_pretrained` of the adapter),
`rollout_load_seconds` (the `/v1/load_lora_adapter` request and the unload of the previous adapter) and
`rollout_sampling_seconds` (the `/v1/completions` round trip, the server's sampling included). `rest` is the served
step less those three: the teacher's forward, the student's forward and backward and the optimizer, which the local
step has too; the local step less `rest` estimates local sampling.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROLLOUT_KEYS = ("rollout_save_seconds", "rollout_load_seconds", "rollout_sampling_seconds")
MODES = ("local", "served")


@dataclass
class RolloutBenchArguments:
    student: str = field(metadata={"help": "The student folder; the server serves it as the base model."})
    teacher: str = field(metadata={"help": "The teacher folder (a live teacher in the training process)."})
    train_data: str = field(default=str(REPO / "examples/data/prompts/train.jsonl"))
    steps: int = field(default=4, metadata={"help": "Optimizer steps per run; the first is not timed."})
    rounds: int = field(default=2, metadata={"help": "Pairs of runs; round 1 runs local then served, round 2 served "
                                                     "then local, and so on."})
    batch_size: int = field(default=8)
    max_length: int = field(default=160)
    max_new_tokens: int = field(default=32)
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (the server is started with this max rank)."})
    server_timeout: int = field(default=900, metadata={
        "help": "The served runs' --teacher_server_timeout. The shipped server answers one row's request at a time, "
                "so a request's time includes the rows queued before it; a retried request queues its work again."})
    work_dir: str | None = field(default=None)
    output_json: str | None = field(default=None)

    def __post_init__(self):
        from gkd.errors import ConfigError

        if self.steps < 2:
            raise ConfigError(f"--steps must be at least 2 (the first step is not timed), got {self.steps}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")


def train(args: RolloutBenchArguments, name: str, extra: list[str], work: Path, env: dict) -> dict:
    """One run in a fresh process: the seconds between its step log lines, and its metrics.jsonl step lines."""
    output_dir = work / f"run-{name}"
    subprocess.run(["rm", "-rf", str(output_dir)])
    command = [sys.executable, str(REPO / "gkd/train.py"), "--model_name_or_path", args.student,
               "--teacher_model_name_or_path", args.teacher, "--dataset_name", args.train_data,
               "--output_dir", str(output_dir), "--max_steps", str(args.steps),
               "--per_device_train_batch_size", str(args.batch_size), "--max_length", str(args.max_length),
               "--max_new_tokens", str(args.max_new_tokens), "--lmbda", "1", "--use_peft", "--lora_r", str(args.lora_r),
               "--learning_rate", "1e-4", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
               "--disable_tqdm", "true", "--seed", "0", *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, logged = [], []
    for line in process.stdout:  # transformers prints each step's log dict as it is logged
        output.append(line)
        if line.startswith("{") and "'loss'" in line and "train_runtime" not in line:
            logged.append(time.perf_counter())
    process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n" + "".join(output[-40:]))
    steps = [line for line in (json.loads(text) for text in (output_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in line]
    if len(logged) != args.steps or len(steps) != args.steps:
        raise RuntimeError(f"run {name}: {len(logged)} step lines printed, {len(steps)} logged, {args.steps} expected")
    timed = steps[1:]
    report = {"step_seconds": [later - earlier for earlier, later in zip(logged, logged[1:])],
              "process_seconds": time.perf_counter() - started,
              "completion_tokens": statistics.mean(line["completion_tokens"] for line in timed),
              **{key: [line[key] for line in timed] for key in ROLLOUT_KEYS if key in timed[0]}}
    print(f"{name:10s} {statistics.mean(report['step_seconds']):.2f} s/step over steps 2-{args.steps}, "
          f"{report['completion_tokens']:.1f} completion tokens a row"
          + "".join(f", {key.split('_')[1]} {statistics.mean(report[key]):.3f} s" for key in ROLLOUT_KEYS
                    if key in report), flush=True)
    return report


def summarise(runs: list[dict]) -> dict:
    """Per mode: the mean step over every timed step of its runs, and the served runs' per-step costs."""
    summary = {}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        row = {"timed_steps": sum(len(run["step_seconds"]) for run in mine),
               "step_seconds": statistics.mean(value for run in mine for value in run["step_seconds"]),
               "completion_tokens": statistics.mean(run["completion_tokens"] for run in mine)}
        for key in ROLLOUT_KEYS:
            if key in mine[0]:
                row[key] = statistics.mean(value for run in mine for value in run[key])
        summary[mode] = row
    served, local = summary["served"], summary["local"]
    served["rest_seconds"] = served["step_seconds"] - sum(served[key] for key in ROLLOUT_KEYS)
    local["sampling_seconds_estimate"] = local["step_seconds"] - served["rest_seconds"]
    served["step_time_vs_local"] = served["step_seconds"] / local["step_seconds"]
    return summary


def table(summary: dict) -> str:
    local, served = summary["local"], summary["served"]
    rows = ["| rollouts | step time | vs local | adapter save | load request | sampling (HTTP round trip) "
            "| rest of the step | completion tokens a row |", "|---|---|---|---|---|---|---|---|",
            f"| local | {local['step_seconds']:.2f} s | 1.00 | - | - | {local['sampling_seconds_estimate']:.2f} s "
            f"(estimated) | - | {local['completion_tokens']:.1f} |",
            f"| served | {served['step_seconds']:.2f} s | {served['step_time_vs_local']:.2f} | "
            f"{served['rollout_save_seconds']:.3f} s | {served['rollout_load_seconds']:.3f} s | "
            f"{served['rollout_sampling_seconds']:.2f} s | {served['rest_seconds']:.2f} s | "
            f"{served['completion_tokens']:.1f} |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from gkd.cli import parse

    (args,) = parse(RolloutBenchArguments, argv, description=__doc__.splitlines()[0])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gkd-bench-rollouts-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "HF_DATASETS_CACHE": str(work / "datasets-cache")}
    server = subprocess.Popen([sys.executable, "-m", "gkd.tools.teacher_server", "--model_name_or_path", args.student,
                               "--port", "0", "--enable_lora", "--max_lora_rank", str(args.lora_r)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    runs = []
    try:
        first_line = server.stdout.readline()
        started = re.search(r"(http://[\d.]+:\d+)", first_line)
        if started is None:
            raise RuntimeError(f"gkd-teacher-serve did not start (exit code {server.poll()}): {first_line!r}")
        url = started.group(1)
        served = ["--rollout_server_url", url, "--rollout_adapter_dir", str(work / "adapters"),
                  "--teacher_server_timeout", str(args.server_timeout)]
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else reversed(MODES):
                run = train(args, f"{mode}-{round_index + 1}", served if mode == "served" else [], work, env)
                runs.append({"mode": mode, "round": round_index + 1, **run})
                if args.output_json:  # the runs so far, in case the bench is stopped before the summary
                    Path(args.output_json).write_text(json.dumps({"options": asdict(args), "runs": runs}, indent=2))
    finally:
        server.kill()
        server.communicate()
    report = {"options": asdict(args), "cpus": os.cpu_count(), "runs": runs, "summary": summarise(runs),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(table(report["summary"]))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from gkd.cli import run

    run(main)
