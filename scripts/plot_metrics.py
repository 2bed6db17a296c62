"""Plot a training run's loss and tokens/s to a PNG.

    python scripts/plot_metrics.py RUN_DIR [--out loss.png]      # default RUN_DIR/metrics.png
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.cli import CLIError, parser, run  # noqa: E402


def main(args) -> int:
    from training.plot import plot_run
    try:
        path = plot_run(args.run_dir, args.out)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(path)
    return 0


if __name__ == "__main__":
    p = parser("Plot loss and tokens/s of a training run (RUN_DIR/metrics.jsonl) to a PNG.")
    p.add_argument("run_dir", help="the run directory given to scripts/train.py --run-dir")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    run(main, p.parse_args())
