"""Prune a Llama-family model into a smaller student, Minitron style (the method is described in gkd/tools/prune.py).

    python scripts/prune.py --model_name_or_path ~/.cache/gkd/smollm2-135m-instruct --num_layers 22 \
        --output_dir /tmp/student [--mlp_hidden_size 1024] [--calibration_data examples/data/prompts/train.jsonl]
    python scripts/prune.py --model_name_or_path ~/.cache/gkd/smollm2-135m-instruct --output_dir /tmp/student \
        --hidden_size 504 --mlp_hidden_size 672 [--num_attention_heads 6] [--num_key_value_heads 3]

Depth and width options combine freely. The same command as `gkd-prune`. The student folder loads with
from_pretrained; its pruning.json records the measured importance, what was kept, and the parameter counts of teacher
and student.
"""

from gkd.cli import command

if __name__ == "__main__":
    command("gkd.tools.prune")
