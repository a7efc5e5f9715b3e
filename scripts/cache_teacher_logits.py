"""Cache the teacher's top-K log-probabilities over a dataset once, for training with `--teacher_logits_path`.

    python scripts/cache_teacher_logits.py --teacher_model_name_or_path T --dataset_name D --top_k 100 --output_dir C
    accelerate launch --num_processes N scripts/cache_teacher_logits.py ...     (each rank scores its share)

The same command as `gkd-cache-teacher`; see gkd/tools/cache_teacher.py.
"""

from gkd.cli import command

if __name__ == "__main__":
    command("gkd.tools.cache_teacher")
