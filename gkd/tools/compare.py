"""Same teacher, prompts and steps, several students, objectives and seeds: which training brings a student closest?

    python scripts/compare_objectives.py --student S --teacher T --output_dir runs/compare \\
        [--runs sft,supervised_kd,...] [--plan study.yaml] [any gkd/train.py option, e.g. --max_steps 100]

Every run is the real CLI (`gkd/train.py`) in a subprocess; then every result, each student as it started, and the
teacher are evaluated together on the same validation prompts (`gkd-eval`: the teacher's answers are computed once).
A plan file names the students, the runs (their own options on top of the common ones) and extra seeds:

    students: {depth: ~/.cache/gkd/smollm2-135m-pruned-22l, width: ~/.cache/gkd/smollm2-135m-width}
    common: [--max_steps, 120, --learning_rate, 1e-4]
    runs: {gkd_l0.5: [--lmbda, 0.5], sft: [--objective, sft, --seq_kd, true, --lmbda, 0]}
    seeds: {gkd_l0.5: [1]}

Runs already finished in the output folder are reused and a run stopped part-way (preempted, killed) resumes from its
newest complete checkpoint, so an interrupted study continues where it stopped. A run folder that can be neither (one
trained with other options than the plan gives it now, or an unfinished run with no complete checkpoint) is refused,
not reported under the new options nor deleted; `--overwrite` moves it aside and trains that run anew. The whole plan
(every student, teacher, data path and run option) is checked before the first run trains. Writes
OUTPUT_DIR/results.json and results.md (metrics with 95% bootstrap intervals, and each model's paired difference to
its student's `--reference` run, by default where it started; with several students, each one's runs minus the
first student's same runs) and compare.png. `train_seconds` is the wall time of the runs this invocation trained
(start-up included); `train_runtime` every run's own training seconds, reused runs too.
"""

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gkd.errors import ConfigError, GKDError

REPO = Path(__file__).resolve().parents[2]
OBJECTIVES = {
    "sft": ["--objective", "sft", "--seq_kd", "True", "--lmbda", "0"],
    "supervised_kd": ["--lmbda", "0", "--beta", "0"],
    **{
        f"gkd_l{lmbda}_b{beta}": ["--lmbda", str(lmbda), "--beta", str(beta)]
        for lmbda in (0.5, 1)
        for beta in (0, 0.5, 1)
    },
}
DIFFERENCES = ("answer_accuracy", "reverse_kl", "teacher_nll")


@dataclass
class CompareConfig:
    """Options of scripts/compare_objectives.py; every other option is passed to each training run."""

    teacher: str = field(metadata={"help": "The teacher every run distils from (folder or Hub id)."})
    output_dir: str = field(metadata={"help": "Where the runs, results.json, results.md and compare.png go."})
    student: str | None = field(default=None, metadata={"help": "The student every run starts from."})
    plan: str | None = field(default=None, metadata={"help": "A YAML plan: students, common, runs, seeds."})
    runs: str | None = field(default=None, metadata={"help": f"Comma-separated presets: {', '.join(OBJECTIVES)}."})
    train_data: str = field(default=str(REPO / "examples/data/prompts/train.jsonl"))
    val_data: str = field(default=str(REPO / "examples/data/prompts/val.jsonl"))
    eval_records: int = field(default=60, metadata={"help": "Validation prompts to evaluate on."})
    eval_max_new_tokens: int = field(default=48)
    seed: int = field(default=0, metadata={"help": "Training seed of every run (plans add seeds), and the eval's."})
    bootstrap_samples: int = field(default=1000)
    reference: str = field(default="start", metadata={"help": "The run each model's paired difference is taken to."})
    overwrite: bool = field(default=False, metadata={
        "help": "Move aside (to <folder>.replaced-N) a run folder this plan can neither reuse nor resume, and train "
                "that run anew. Runs that match the plan are still reused or resumed."})


@dataclass
class Plan:
    students: dict[str, str]
    runs: dict[str, list[str]]
    seeds: dict[str, list[int]]
    common: list[str]


def load_plan(config: CompareConfig, train_overrides: list[str]) -> Plan:
    """The runs to make: from --plan, or from --runs presets (all of them by default) with --student. A plan's shape
    is checked whole here, and every run's options later by the training parser, before the first run trains."""
    import yaml

    from gkd.cli import _unique_key_loader

    spec = {}
    if config.plan:
        try:  # a run or student named twice would otherwise keep the last without a word
            spec = yaml.load(Path(config.plan).read_text(), Loader=_unique_key_loader())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"--plan {config.plan}: cannot read it ({' '.join(str(error).split())})") from None
        if not isinstance(spec, dict) or set(spec) - {"students", "runs", "seeds", "common"}:
            found = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
            raise ConfigError(f"--plan {config.plan}: expected a mapping of students, common, runs, seeds; "
                              f"found {found}")
        if not spec.get("runs"):
            raise ConfigError(f"--plan {config.plan}: names no runs; add runs: {{name: [options...]}}")
    students = _mapping(spec, "students", config.plan) or ({"student": config.student} if config.student else {})
    if not students:
        raise ConfigError("give --student, or students in --plan")
    runs = {str(name): _options(args, f"runs.{name}", config.plan)
            for name, args in _mapping(spec, "runs", config.plan).items()}
    names = [name.strip() for name in (config.runs or ("" if runs else ",".join(OBJECTIVES))).split(",")
             if name.strip()]
    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"--runs: unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")
    for index, name in enumerate(names):
        if name in names[:index] or name in runs:
            where = "in --plan and in --runs" if name in runs else "twice in --runs"
            raise ConfigError(f"the run '{name}' is named {where}; name each run once")
    runs.update({name: OBJECTIVES[name] for name in names})
    for name in ("start", "teacher"):
        if name in runs:
            raise ConfigError(f"--plan {config.plan}: a run may not be named '{name}': the report's {name} row has "
                              "that name")
    extra_seeds = _mapping(spec, "seeds", config.plan)
    for name, values in extra_seeds.items():
        if name not in runs or not isinstance(values, list) or not all(isinstance(v, int) for v in values):
            raise ConfigError(f"--plan {config.plan}: seeds.{name} must be a list of integers for one of the runs")
    seeds = {name: sorted({config.seed, *extra_seeds.get(name, [])}) for name in runs}
    common = _options(spec.get("common") or [], "common", config.plan) + train_overrides
    return Plan({str(name): _resolved(str(path)) for name, path in students.items()}, runs, seeds, common)


def _mapping(spec: dict, key: str, plan: str) -> dict:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"--plan {plan}: {key} must be a mapping of name: value, got {type(value).__name__}")
    return value


def _options(value, where: str, plan: str) -> list[str]:
    """A run's options: a YAML list, or one string split as a shell would."""
    if isinstance(value, str):
        return shlex.split(value)
    if not isinstance(value, list) or any(isinstance(item, (dict, list)) for item in value):
        raise ConfigError(f"--plan {plan}: {where} must be a list of options like [--lmbda, 0.5]")
    return [str(item) for item in value]


def _resolved(path: str) -> str:
    """A folder as an absolute path (runs start wherever this process started), a Hub id as given."""
    expanded = Path(path).expanduser()
    return str(expanded.resolve()) if expanded.exists() else path


def check_runs(config: CompareConfig, plan: Plan) -> None:
    """Parse every run's full training command and check every model, cache and data path it names (and the teacher
    and data the evaluation reads) before the first run trains: a typo or a missing student in the last run of a
    study must not wait hours to be found."""
    from gkd.train import parse_args

    _check_model(config.teacher, "--teacher")
    _check_data(config.val_data, "--val_data")
    checked = set()
    for student, path in plan.students.items():
        for run, args in plan.runs.items():
            for seed in plan.seeds[run]:
                command = train_command(path, config, [*plan.common, *args], seed, Path(config.output_dir) / "x")
                try:
                    script_args, model_args, _ = parse_args(command[2:])
                    for flag, name, revision in _inputs(script_args, model_args):
                        if (flag, name) not in checked:
                            _check_model(name, flag, revision) if revision else _check_data(name, flag)
                            checked.add((flag, name))
                except GKDError as error:
                    raise ConfigError(f"run {student}/{run}: {error}") from None


def _inputs(script_args, model_args) -> list[tuple[str, str, str | None]]:
    """(flag, path or Hub id, revision for a model, None for data) of every model, cache and data set a run reads."""
    named = [("--model_name_or_path", model_args.model_name_or_path, model_args.model_revision),
             ("--teacher_model_name_or_path", model_args.teacher_model_name_or_path, model_args.teacher_model_revision),
             ("--teacher_logits_path", model_args.teacher_logits_path, None),
             ("--dataset_name", script_args.dataset_name, None),
             ("--eval_dataset_name", script_args.eval_dataset_name, None)]
    return [(flag, str(name), revision) for flag, name, revision in named if name]


def _check_model(name: str, flag: str, revision: str = "main") -> None:
    from gkd import models

    models.check_model(models.ModelRef(name, revision, flag=flag))


def _check_data(name: str, flag: str) -> None:
    """A data path (or a teacher cache) exists; a Hub dataset id is left to the run, whose records are checked there
    before it trains."""
    from gkd.data.sources import looks_like_path

    if flag == "--teacher_logits_path":
        from gkd.teachers.cache import read_manifest

        read_manifest(name)
    elif not Path(name).expanduser().exists() and looks_like_path(name):
        raise ConfigError(f"{flag} {name}: no such file or folder")


def run_folder(output_dir: Path, plan: Plan, student: str, run: str, seed: int, default_seed: int) -> Path:
    folder = output_dir / student if len(plan.students) > 1 else output_dir
    return folder / (run if seed == default_seed else f"{run}-s{seed}")


def model_name(plan: Plan, student: str, run: str, seed: int, default_seed: int) -> str:
    name = f"{student}/{run}" if len(plan.students) > 1 else run
    return name if seed == default_seed else f"{name}@s{seed}"


def finished(folder: Path) -> bool:
    """A run that saved its final model (the runner reuses it rather than train again)."""
    return (folder / "run_config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "adapter_model.safetensors").is_file()
        or (folder / "model.safetensors.index.json").is_file())


def train_runtime(folder: Path) -> float | None:
    """The run's own training seconds (Trainer's end-of-run `train_runtime`), known for reused runs too."""
    from gkd.run_folder import METRICS_FILE, read_metrics

    if not (folder / METRICS_FILE).is_file():
        return None
    runtimes = [record["train_runtime"] for record in read_metrics(folder) if "train_runtime" in record]
    return runtimes[-1] if runtimes else None


def next_step(folder: Path, name: str, command: list[str], overwrite: bool) -> str:
    """What this invocation does with one run's folder (`command` as train_command builds it), decided before the first
    run trains: `reuse` a finished run trained as the plan says, `resume` a run stopped part-way (preempted, killed)
    from its newest complete checkpoint, `train` in a new folder or one holding no run's results (gkd-train replaces a
    failed start's files itself), and `replace` anything else: moved aside first, and only with --overwrite; never
    deleted."""
    from gkd.checkpoints import last_complete_checkpoint
    from gkd.run_folder import METRICS_FILE, read_metrics, results_in

    if not folder.exists():
        return "train"
    if finished(folder) or last_complete_checkpoint(folder)[0] is not None:
        problem = _other_run(folder, command)
        if problem is None:
            return "reuse" if finished(folder) else "resume"
    elif results_in(folder) or ((folder / METRICS_FILE).is_file()
                                and any("loss" in record for record in read_metrics(folder))):
        problem = (f"holds an unfinished run with no complete checkpoint to resume from "
                   f"({', '.join(results_in(folder)) or 'metrics.jsonl of its steps'})")
    else:
        return "train"
    if overwrite:
        return "replace"
    raise ConfigError(f"{name}: {folder} {problem}; pass --overwrite to move it aside and train the run again, or use "
                      "another --output_dir")


def _other_run(folder: Path, command: list[str]) -> str | None:
    """Why the run in `folder` is not the one this plan gives (`command`), or None when it is: a plan edited after its
    runs (more steps, another learning rate) must not report or continue the old runs under the new options.
    Compared without the interpreter, the script's path and a resume's --resume_from_checkpoint."""
    expected = command[2:]
    try:
        recorded = json.loads((folder / "run_config.json").read_text(encoding="utf-8"))["command"][1:]
    except (OSError, ValueError, TypeError, KeyError):
        return ("is unusable: its run_config.json does not say how the run was trained (expected gkd's JSON with a "
                "`command` list)")
    if "--resume_from_checkpoint" in recorded[:-1]:
        at = recorded.index("--resume_from_checkpoint")
        recorded = recorded[:at] + recorded[at + 2:]
    if recorded == expected:
        return None
    before, now = _options_of(recorded), _options_of(expected)
    changed = [f"{flag} {before.get(flag, '(unset)')} -> {now.get(flag, '(unset)')}"
               for flag in sorted(before.keys() | now.keys()) if before.get(flag) != now.get(flag)]
    return (f"holds a run trained with other options than this plan gives it "
            f"({'; '.join(changed) or 'the same options in another order'})")


def _options_of(arguments: list[str]) -> dict[str, str]:
    options, flag = {}, None
    for argument in arguments:
        if argument.startswith("--"):
            flag = argument
            options[flag] = ""
        elif flag is not None:
            options[flag] = f"{options[flag]} {argument}".strip()
    return options


def train_command(student: str, config: CompareConfig, args: list[str], seed: int, folder: Path) -> list[str]:
    # A run that reads its teacher from a cache or a server names it itself; the others distil from --teacher.
    own_teacher = any(flag in args for flag in ("--teacher_logits_path", "--teacher_server_url"))
    teacher = [] if own_teacher else ["--teacher_model_name_or_path", config.teacher]
    return [sys.executable, str(REPO / "gkd/train.py"), "--model_name_or_path", student, *teacher,
            "--dataset_name", config.train_data, "--output_dir", str(folder), "--save_strategy", "no",
            "--report_to", "none", "--seed", str(seed), *args]


def train(folder: Path, student: str, config: CompareConfig, args: list[str], seed: int, step: str) -> float:
    """One run through the real CLI, in this process's folder (relative paths mean what they meant here), as
    `next_step` decided: trained, resumed from its newest complete checkpoint (`--resume_from_checkpoint last`), or
    trained after its old folder was moved aside; returns its wall seconds."""
    from gkd.folders import move_aside

    command = train_command(student, config, args, seed, folder)
    if step == "resume":
        command += ["--resume_from_checkpoint", "last"]
        print(f"== {folder}: stopped part-way by an earlier run of this study, resuming it", flush=True)
    elif step == "replace":
        print(f"== --overwrite: moved {folder} to {move_aside(folder, 'replaced')}", flush=True)
    print(f"== {folder.name}: {' '.join(command[2:])}", flush=True)
    started = time.time()
    process = subprocess.Popen(command)
    try:
        returncode = process.wait()
    except BaseException:  # Ctrl-C or SIGTERM: the run got it too and saves a checkpoint at its step's end; let it
        process.wait()
        raise
    if returncode != 0:  # the run printed its own `error:` line: one is enough
        print(f"== {folder.name} failed with exit code {returncode}; its error is above", file=sys.stderr)
        raise SystemExit(returncode)
    if not finished(folder):  # stopped by a signal at a step's end: its checkpoint is saved, not its final model
        raise ConfigError(f"{folder.name} stopped before its final model (its checkpoint is saved); run the same "
                          "command again to resume it")
    return time.time() - started


def differences(report: dict, plan: Plan, reference: str, config: CompareConfig) -> dict:
    """Each model minus its student's reference run, on the same prompts, with a 95% paired bootstrap interval."""
    pairs = {}
    for name in report["models"]:
        if name == "teacher":
            continue
        student = name.split("/")[0] if len(plan.students) > 1 else None
        pairs[name] = f"{student}/{reference}" if student else reference
    return _paired_differences(report, pairs, config)


def student_differences(report: dict, plan: Plan, config: CompareConfig) -> dict:
    """Depth or width? Each later student minus the plan's first one, start against start and run against the same
    run and seed, on the same prompts, with a 95% paired bootstrap interval."""
    first, *others = plan.students
    pairs = {name: f"{first}/{name.split('/', 1)[1]}" for name in report["models"]
             if any(name.startswith(f"{student}/") for student in others)}
    return _paired_differences(report, pairs, config)


def _paired_differences(report: dict, pairs: dict[str, str], config: CompareConfig) -> dict:
    """{name: {reference, metric: {difference, interval}}} for each (name, reference) pair the report holds both of."""
    from gkd.tools.evaluate import paired_difference

    result = {}
    for name, base in pairs.items():
        if base == name or base not in report["models"]:
            continue
        result[name] = {"reference": base}
        for metric in DIFFERENCES:
            value, interval = paired_difference(report, name, base, metric, config.bootstrap_samples, config.seed)
            result[name][metric] = {"difference": value, "interval": interval}
    return result


def differences_table(differences_by_model: dict) -> str:
    if not differences_by_model:
        return ""
    lines = ["| model | reference | " + " | ".join(f"{metric} difference [95% interval]" for metric in DIFFERENCES)
             + " |", "|---|---|" + "---|" * len(DIFFERENCES)]
    for name, row in differences_by_model.items():
        cells = []
        for metric in DIFFERENCES:
            value, interval = row[metric]["difference"], row[metric]["interval"]
            if value is None:
                cells.append("n/a")
                continue
            text = f"{_signed(value)} [{_signed(interval[0])}, {_signed(interval[1])}]" if interval else _signed(value)
            # "real" as printed: an interval that rounds to [0, 0] (two equal models) is not a difference
            seen = interval and (round(interval[0], 3) > 0 or round(interval[1], 3) < 0)
            cells.append(f"**{text}**" if seen else text)
        lines.append(f"| {name} | {row['reference']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Bold: the interval excludes 0, a difference these prompts can see.")
    return "\n".join(lines)


def _signed(value: float) -> str:
    """Three decimals with a sign; what rounds to zero prints as +0.000, never -0.000."""
    return f"{0.0 if abs(value) < 5e-4 else value:+.3f}"


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
        intervals = [report["models"][name].get(f"{key}_ci") for name in names]
        errors = [[max(v - (ci or (v, v))[0], 0) for v, ci in zip(values, intervals)],
                  [max((ci or (v, v))[1] - v, 0) for v, ci in zip(values, intervals)]]
        axis.bar(range(len(names)), values, yerr=errors, capsize=2)
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        axis.set_title(label)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    from gkd import data
    from gkd.cli import parse
    from gkd.folders import check_output
    from gkd.tools.evaluate import evaluate_folders, markdown_table

    config, train_overrides = parse(CompareConfig, argv, description=__doc__.splitlines()[0], allow_extra=True)
    for name in ("teacher", "train_data", "val_data", "output_dir"):  # the runs see them as this process does
        setattr(config, name, _resolved(getattr(config, name)))
    config.output_dir = str(Path(config.output_dir).expanduser().absolute())
    plan = load_plan(config, train_overrides)
    check_runs(config, plan)
    conversations = data.load_conversations(config.val_data)[: config.eval_records]  # validate before training
    output_dir = Path(config.output_dir)
    inputs = [*plan.students.values(), config.teacher, config.train_data, config.val_data]
    check_output(output_dir, inputs, replaces=False)  # written into (runs, results), never moved aside
    runs, named = {}, {}  # name -> (folder, student, options, seed, step): every folder judged before a run trains
    for student, path in plan.students.items():
        for run, args in plan.runs.items():
            for seed in plan.seeds[run]:
                folder = run_folder(output_dir, plan, student, run, seed, config.seed)
                name = model_name(plan, student, run, seed, config.seed)
                if folder in named:
                    raise ConfigError(f"the runs {named[folder]} and {name} would both train in {folder}; rename one")
                named[folder] = name
                check_output(folder, inputs, f"{name}: folder")
                options = [*plan.common, *args]
                step = next_step(folder, name, train_command(path, config, options, seed, folder), config.overwrite)
                runs[name] = (folder, path, options, seed, step)
    trained, seconds = {}, {}
    for name, (folder, path, args, seed, step) in runs.items():
        if step == "reuse":
            print(f"== {name}: finished earlier in {folder}, reusing it", flush=True)
        else:
            seconds[name] = train(folder, path, config, args, seed, step)
        trained[name] = folder
    starts = {(f"{student}/start" if len(plan.students) > 1 else "start"): path
              for student, path in plan.students.items()}
    started = time.time()
    report = evaluate_folders({**starts, **trained}, config.teacher, conversations, config.eval_max_new_tokens,
                              seed=config.seed, bootstrap_samples=config.bootstrap_samples)
    runtimes = {name: train_runtime(folder) for name, folder in trained.items()}
    report.update(train_seconds=seconds, train_runtime=runtimes,
                  eval_seconds=time.time() - started, command=sys.argv, commit=_git_commit(),
                  plan={"students": plan.students, "common": plan.common, "runs": plan.runs, "seeds": plan.seeds})
    report["differences"] = differences(report, plan, config.reference, config)
    report["student_differences"] = student_differences(report, plan, config)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report) + "\n" + differences_table(report["differences"])
    if report["student_differences"]:
        table += ("\n\nEach student against the first, run by run:\n\n"
                  + differences_table(report["student_differences"]))
    (output_dir / "results.md").write_text(f"Command: `{' '.join(sys.argv)}`\n\n{table}\n")
    plot(report, output_dir / "compare.png")
    print(table)
    print(f"wrote {output_dir / 'results.md'} and {output_dir / 'compare.png'}")
    return 0


if __name__ == "__main__":  # `python -m gkd.tools.compare`; `gkd-compare` runs gkd.cli.command
    from gkd.cli import run

    run(main)
