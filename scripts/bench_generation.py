"""Time on-policy sampling alone: gkd's generation backends against transformers' `generate`.

    python scripts/bench_generation.py --preset cpu-tiny --backends plain static
    python scripts/bench_generation.py --preset h100 --backends plain hf-compiled static compiled   # on one GPU

What is measured and how: gkd/bench_generation.py. Results: docs/performance.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # `import gkd` without an install (see gkd/train.py)

from gkd.bench_generation import main

if __name__ == "__main__":
    main()
