"""Merge the LoRA adapter of a `--use_peft` run into its base model: one standalone checkpoint to serve.

    python scripts/merge_lora.py --adapter_path runs/smol-gkd --output_dir runs/smol-gkd-merged [--dtype bf16]

The base model defaults to the one recorded in the adapter (or the run's run_config.json); see gkd/merge.py.
"""

import sys
from pathlib import Path

try:
    import gkd  # noqa: F401
except ImportError:  # run as a file without installing gkd: sys.path[0] is scripts/, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import HfArgumentParser  # the argument parser only: torch loads later, after the cheap checks

from gkd.cli import quiet_libraries, run
from gkd.merge import MergeConfig, merge_lora


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(MergeConfig, description=__doc__.splitlines()[0])
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv)
        quiet_libraries()
        merge_lora(config)
    except KeyboardInterrupt:  # the partial output was already removed on the way out of merge_lora
        print("error: interrupted; the output folder was left as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    run(main)
