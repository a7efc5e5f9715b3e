"""Estimate the peak accelerator memory of one gkd training step at a bench preset's shapes, without a GPU.

    python scripts/memory_budget.py --preset h100
    python scripts/memory_budget.py --preset h100 --gradient_checkpointing --lora --output_json budget.json

How each part is counted or measured: gkd/memory_budget.py. Results: docs/performance.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # `import gkd` without an install (see gkd/train.py)

from gkd.memory_budget import main

if __name__ == "__main__":
    main()
