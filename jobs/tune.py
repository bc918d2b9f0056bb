"""Entry point for `ray job submit`; the same code as `mobile-vla tune`.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_small.yaml run.name=sweep-1

Inside a Ray job RAY_ADDRESS is set, so the sweep joins that cluster instead of starting a local one.
"""

import sys
from pathlib import Path

try:
    import mobile_vla  # noqa: F401  (installed on the cluster's nodes)
except ModuleNotFoundError:  # a checkout uploaded with --working-dir: use its package folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mobile_vla.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
