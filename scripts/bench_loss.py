"""Time and measure the memory of one GKD loss call (forward + backward): full logits against the chunked fused loss.

    python scripts/bench_loss.py                                   # CPU defaults, well under a minute
    python scripts/bench_loss.py --rows 2048 --hidden_student 896 --hidden_teacher 896 --vocab 151936 \\
        --chunk_size 1024 --variants chunked --output_json loss.json
    python scripts/bench_loss.py --device cuda --dtype float32 --autocast    # what the trainer does with --bf16

What is measured and how: gkd/bench_loss.py. Results: docs/performance.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # `import gkd` without an install (see gkd/train.py)

from gkd.bench_loss import main

if __name__ == "__main__":
    main()
