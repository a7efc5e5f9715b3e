"""Same teacher, prompts and steps, several students, objectives and seeds: which training brings a student closest?

    python scripts/compare_objectives.py --student S --teacher T --output_dir runs/compare \
        [--runs sft,supervised_kd,...] [--plan study.yaml] [any gkd/train.py option, e.g. --max_steps 100]

The runs, the plan file and the report: gkd/tools/compare.py. The studies in docs/results.md are its plans in
examples/studies/.
"""

from gkd.cli import command

if __name__ == "__main__":
    command("gkd.tools.compare")
