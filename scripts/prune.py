"""Prune a Llama-family model into a smaller student, Minitron style (the method is described in gkd/pruning.py).

    python scripts/prune.py --model_name_or_path ~/.cache/gkd/smollm2-135m-instruct --num_layers 22 \
        --output_dir /tmp/student [--mlp_hidden_size 1024] [--calibration_data examples/data/prompts/train.jsonl]

The student folder loads with from_pretrained; its pruning.json records the measured importance and what was cut.
"""

import logging
import sys
from pathlib import Path

try:
    import gkd  # noqa: F401
except ImportError:  # run as a file without installing gkd: sys.path[0] is scripts/, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import HfArgumentParser

from gkd.cli import quiet_libraries, run
from gkd.pruning import PruneConfig, prune


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(PruneConfig, description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    quiet_libraries()
    report = prune(config)
    depth = report["depth"]
    print(f"saved {depth['num_layers_after']}-layer student to {config.output_dir} (dropped {depth['dropped_layers']})")
    return 0


if __name__ == "__main__":
    run(main)
