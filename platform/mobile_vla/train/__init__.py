"""Training: Ray Train V2 `train_loop_per_worker`, the driver, checkpoints, and the training samples
(windows and the Ray Data pipeline), which need the policy's preprocessing.

    mobile-vla train --config jobs/configs/small.yaml

Import the submodules directly: this package imports nothing heavy at start.
"""
