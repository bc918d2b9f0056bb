"""Entry point for schedulers; the same code as `mobile-vla online-update`.

    ray job submit --working-dir . -- python jobs/online_update.py --config jobs/configs/online_update.yaml
    0 3 * * *  cd /srv/mobile-vla && .venv/bin/python jobs/online_update.py --config jobs/configs/online_update.yaml

Exit status: 0 promoted or no new feedback, 1 challenger rejected by the gate, 2 bad input.
"""

import sys
from pathlib import Path

try:
    import mobile_vla  # noqa: F401  (installed on the cluster's nodes)
except ModuleNotFoundError:  # a checkout uploaded with --working-dir: use its package folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mobile_vla.cli import main

if __name__ == "__main__":
    sys.exit(main(["online-update", *sys.argv[1:]]))
