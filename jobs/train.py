"""Entry point for `ray job submit`; the same code as `mobile-vla train`.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/full_gpu.yaml run.name=full-1

Inside a Ray job RAY_ADDRESS is set, so the run joins that cluster instead of starting a local one.
"""

import sys
from pathlib import Path

try:
    import mobile_vla  # noqa: F401  (installed on the cluster's nodes)
except ModuleNotFoundError:  # a checkout uploaded with --working-dir: use its package folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mobile_vla.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
