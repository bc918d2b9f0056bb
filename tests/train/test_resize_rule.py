"""Regression: the resize rule a dataset was imported with is the one its trained model serves with.

`data import --resize-rule center_crop` records the rule in the manifest; training once built its
preprocessing without it, so the model learnt centre-cropped frames and then served letterboxed ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mobile_vla.data.frames import resize_frame
from mobile_vla.data.importer import import_minuum_h5
from mobile_vla.policy.checkpoint import load_policy
from mobile_vla.policy.model import build_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.train import checkpointing
from mobile_vla.train.job_config import load_train_config
from mobile_vla.train.preflight import ClusterCapacity, preflight
from mobile_vla.train.trainer import build_preprocessing, loop_config
from tests.data.test_importer import collector_file

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"


def test_center_crop_import_trains_and_serves_center_crop(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "robot"
    src.mkdir()
    for seed in range(3):
        collector_file(src / f"episode_{seed}_1box_vert_left.h5", seed=seed)
    import_minuum_h5(src, dst, val_fraction=0.34, resize_rule="center_crop", progress=False)

    # the driver's side of `run_training`, without a cluster: checks, then the run's preprocessing
    cfg = load_train_config(TINY, [f"data.path={dst}"])
    manifest, policy_config = preflight(cfg, capacity=ClusterCapacity(nodes=[{"CPU": 64.0}]))
    shipped = loop_config(cfg, build_preprocessing(cfg, manifest, policy_config), 4, None, None)
    # a worker's side: unpack what the driver sent, write the checkpoint that becomes the model version
    worker = Preprocessing.load(checkpointing.unpack_folder(shipped["preprocessing"], tmp_path / "prep"))
    checkpointing.write_checkpoint(
        tmp_path / "ckpt",
        model=build_policy(policy_config, load_pretrained=False),
        preprocessing=worker,
        optimizer_state={},
        scheduler_state={},
        progress=checkpointing.Progress(),
        job_config={},
        metrics={},
    )
    _, served = load_policy(tmp_path / "ckpt" / checkpointing.POLICY_DIR)

    frame = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)  # 16:9, as the robot's
    assert served.resize_rule == "center_crop"
    np.testing.assert_array_equal(served.prepare_image(frame), resize_frame(frame, 224, "center_crop"))
    assert not np.array_equal(served.prepare_image(frame), resize_frame(frame, 224, "letterbox"))
