"""Benchmark gkd against TRL 1.16's GKDTrainer and DistillationTrainer on identical configurations.

    python scripts/bench.py --preset cpu-tiny --output_json bench.json
    python scripts/bench.py --preset h100 --output_json bench-h100.json   # on one GPU
    python scripts/bench.py --preset h100 --dry_run                       # anywhere: configs only, nothing allocated

What is measured and how: gkd/bench.py. Results: docs/performance.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # `import gkd` without an install (see gkd/train.py)

from gkd.bench import main

if __name__ == "__main__":
    main()
