"""Merge the LoRA adapter of a `--use_peft` run into its base model: one standalone checkpoint to serve.

    python scripts/merge_lora.py --adapter_path runs/smol-gkd --output_dir runs/smol-gkd-merged [--dtype bf16]

The same command as `gkd-merge`; the base model defaults to the one recorded in the adapter (or the run's
run_config.json); see gkd/tools/merge.py.
"""

from gkd.cli import command

if __name__ == "__main__":
    command("gkd.tools.merge")
