"""The feedback write-ahead log: durability across kill -9, torn tails, group commit, assembly into
episode files with corrected labels and weights, and the per-update watermark."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from mobile_vla.cli import main
from mobile_vla.data.episodes import read_episode
from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import DataError
from mobile_vla.online.assembly import FeedbackWeights
from mobile_vla.online.feedback_record import normalise_record
from mobile_vla.online.feedback_store import FeedbackStore
from mobile_vla.online.inspect_feedback import describe_feedback
from mobile_vla.online.wal import encode_frame


def jpeg_bytes(value: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def step_record(
    robot: str,
    episode: str,
    step: int,
    done: bool = False,
    success=None,
    corrected=None,
    intervention: bool = False,
    image: bytes | None = None,
) -> dict:
    return {
        "robot_id": robot,
        "episode_id": episode,
        "step": step,
        "instruction": "go to the red box",
        "image": image if image is not None else jpeg_bytes(step * 20),
        "state": [0.1 * step, 0.0, 0.0],
        "action_executed": [0.5, 0.0, float(step)],
        "action_corrected": corrected,
        "intervention": intervention,
        "episode_done": done,
        "success": success,
        "model": {"name": "mobile-vla-policy", "version": "7"},  # as serving's ingress adds it
    }


WRITER = textwrap.dedent(
    """
    import io, sys
    import numpy as np
    from PIL import Image
    from mobile_vla.online.feedback_store import FeedbackStore

    store = FeedbackStore(sys.argv[1])
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO(); Image.fromarray(noise).save(buffer, format="PNG"); image = buffer.getvalue()
    n = 0
    while True:
        episode, step = divmod(n, 8)
        store.append({"robot_id": f"r{episode % 3}", "episode_id": f"e{episode}", "step": step,
                      "instruction": "go to the red box", "image": image, "state": [0.0, 0.0, 0.0],
                      "action_executed": [0.3, 0.0, 0.1], "action_corrected": [0.4, 0.0, 0.0] if step == 3 else None,
                      "intervention": step == 3, "episode_done": step == 7, "success": True if step == 7 else None})
        print(f"ack r{episode % 3}/e{episode}/{step}", flush=True)
        n += 1
    """
)


def test_acknowledged_records_survive_kill_9_and_torn_tail_is_cut(tmp_path):
    root = tmp_path / "feedback"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    acked = []
    try:
        while len(acked) < 60:
            line = writer.stdout.readline()
            assert line, f"writer exited early with {writer.poll()}"
            acked.append(line.split()[1])
        writer.send_signal(signal.SIGKILL)  # mid-stream: it is appending as fast as it can
    finally:
        writer.kill()
        writer.wait()
    acked += [line.split()[1] for line in writer.stdout.read().splitlines() if line.startswith("ack ")]
    writer.stdout.close()

    segments = sorted((root / "segments").glob("*.wal"))
    assert len(segments) == 1
    # The crash may or may not have torn a frame; make sure the last one is torn, as a crash mid-write would.
    meta, image = normalise_record(step_record("r9", "torn", 0))
    torn = encode_frame(meta, image)
    with open(segments[0], "ab") as handle:
        handle.write(torn[: len(torn) // 2])

    store = FeedbackStore(root)  # restart: repairs the dead writer's segment
    keys = {f"{r.meta['robot_id']}/{r.meta['episode_id']}/{r.meta['step']}" for r in store.replay()}
    assert set(acked) <= keys, f"lost acknowledged records: {sorted(set(acked) - keys)[:5]}"
    assert "r9/torn/0" not in keys
    assert all(scan.problem is None for scan in store.scan()), "a segment still has a torn or corrupt tail"
    assert list((root / "quarantine").glob("*.torn")), "the cut tail is kept for forensics"

    # The store keeps working after the restart, in a new segment.
    store.append(step_record("r5", "after", 0, done=True, success=True))
    assert len(list((root / "segments").glob("*.wal"))) == 2

    result = store.assemble_episodes(tmp_path / "episodes", stale_after_s=None)
    finished = {key.rsplit("/", 1)[0] for key in acked if key.endswith("/7")}
    assert len(result.episodes) == len(finished) + 1  # + r5/after
    for name in result.episodes:
        episode = read_episode(tmp_path / "episodes" / name)
        assert episode.images.shape[1:] == (224, 224, 3) and episode.num_frames in (1, 8)  # normalised at write
    assert sum(load_manifest(tmp_path / "episodes")["counts"]["total"].values()) > 0


def test_bad_records_are_refused_with_the_field_named(tmp_path):
    store = FeedbackStore(tmp_path)
    cases = {
        "robot_id": step_record("../etc", "e", 0),
        "action_executed": {**step_record("r", "e", 0), "action_executed": [0.1, float("nan"), 0.0]},
        "image": step_record("r", "e", 0, image=b"GIF89a........"),
        "step": {**step_record("r", "e", 0), "step": -1},
    }
    for field_name, record in cases.items():
        with pytest.raises(DataError, match=f"feedback record: {field_name}"):
            store.append(record)
    with pytest.raises(DataError, match="image: not valid base64"):
        store.append({**step_record("r", "e", 0), "image": "not base64 !!"})
    assert list(store.replay()) == []


def test_concurrent_appends_share_fsyncs_and_all_land(tmp_path):
    store = FeedbackStore(tmp_path, segment_max_bytes=20_000)  # small: forces rotation under load
    fsyncs = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # segment files; directory syncs on rotation are not counted
            fsyncs.append(fd)
        real_fsync(fd)
        time.sleep(0.02)  # a slow disk: appends arriving meanwhile must ride on the next fsync

    errors = []

    def robot(index: int) -> None:
        try:
            for step in range(25):
                store.append(step_record(f"r{index}", "e0", step))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    os.fsync = counting_fsync
    try:
        threads = [threading.Thread(target=robot, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        os.fsync = real_fsync
    assert not errors
    stored = [(r.meta["robot_id"], r.meta["step"]) for r in store.replay()]
    assert sorted(stored) == sorted((f"r{i}", s) for i in range(4) for s in range(25))
    assert len(list((tmp_path / "segments").glob("*.wal"))) > 1
    # without group commit every record pays its own fsync (100, plus one per rotation); shared, ~60
    assert len(fsyncs) < 90, len(fsyncs)


def test_assembly_labels_weights_retries_and_watermark(tmp_path, capsys):
    root = tmp_path / "feedback"
    replica_a, replica_b = FeedbackStore(root), FeedbackStore(root)  # two Serve replicas, two segments
    png = io.BytesIO()
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    for step in range(6):  # episode A, steps spread over both replicas; step 3 corrected, 4 intervention
        store = replica_a if step % 2 else replica_b
        store.append(
            step_record(
                "alpha",
                "A",
                step,
                done=step == 5,
                success=True if step == 5 else None,
                corrected=[0.9, 0.1, -0.2] if step == 3 else None,
                intervention=step == 4,
            )
        )
    replica_a.append({**step_record("alpha", "A", 2), "action_executed": [0.7, 0.0, 2.0]})  # retried step
    for step in range(3):  # episode B failed; C not finished yet
        replica_b.append(step_record("beta", "B", step, done=step == 2, success=False if step == 2 else None))
        replica_a.append(step_record("gamma", "C", step, image=base64.b64encode(png.getvalue()).decode()))

    weights = FeedbackWeights(corrected=5.0, success=1.0, failure=0.0)
    first = replica_a.assemble_episodes(tmp_path / "update-1", weights=weights, stale_after_s=None)
    assert sorted(first.episodes) == ["fb_alpha_A.h5", "fb_beta_B.h5"]
    assert first.waiting == ["gamma/C"]
    with h5py.File(tmp_path / "update-1" / "fb_alpha_A.h5") as f:
        np.testing.assert_allclose(f["actions"][3], [0.9, 0.1, -0.2])  # the correction is the label
        np.testing.assert_allclose(f["actions"][2], [0.7, 0.0, 2.0])  # the retry's copy wins
        np.testing.assert_allclose(f["action_executed"][3], [0.5, 0.0, 3.0])
        assert f["weight"][()].tolist() == [1, 1, 1, 5, 5, 1]
        assert f["intervention"][()].tolist() == [0, 0, 0, 0, 1, 0]
        assert f["step"][()].tolist() == list(range(6))
        assert f.attrs["success"] and f.attrs["corrected_steps"] == 1
        assert json.loads(f.attrs["model_versions"]) == ["7"]
    with h5py.File(tmp_path / "update-1" / "fb_beta_B.h5") as f:
        assert f["weight"][()].tolist() == [0, 0, 0] and not f.attrs["success"]

    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "update-1")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "feedback: 2 episodes from 2 robots, 9 steps, 1 corrected, 1 interventions, 3 steps with weight 0" in shown
    assert "3 new since the last update, 0 torn tails" in shown

    # Nothing moves until the update that used the files commits; then only new episodes come back.
    assert len(replica_a.assemble_episodes(tmp_path / "again", stale_after_s=None).episodes) == 2
    replica_a.commit_cursor(first.cursor, {"model_version": "3"})
    replica_b.append(step_record("gamma", "C", 3, done=True, success=True))
    replica_b.append(step_record("delta", "D", 0, done=True, success=True))
    second = replica_b.assemble_episodes(tmp_path / "update-2", stale_after_s=None)
    assert sorted(second.episodes) == ["fb_delta_D.h5", "fb_gamma_C.h5"]
    with h5py.File(tmp_path / "update-2" / "fb_gamma_C.h5") as f:
        assert f["images"].shape == (4, 224, 224, 3)  # base64 PNG, 48x64, letterboxed to 224x224 at write

    summary = describe_feedback(root)
    assert summary["segments"] == 2 and summary["episodes"] == 4 and summary["robots"] == 4
    assert summary["corrected_steps"] == 1 and summary["intervention_steps"] == 1
    assert summary["new_episodes_since_last_update"] == 2 and summary["updates"] == 1
    assert summary["torn_or_corrupt"] == []
    with pytest.raises(DataError, match="no feedback segments"):
        describe_feedback(tmp_path / "nothing-here")


def test_stale_unfinished_episode_is_assembled_with_unknown_outcome(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    old = time.time() - 7200
    for step in range(3):
        store.append({**step_record("r", "lost", step), "received_at": old})
    result = store.assemble_episodes(tmp_path / "out", stale_after_s=3600)
    assert result.episodes == ["fb_r_lost.h5"]
    with h5py.File(tmp_path / "out" / "fb_r_lost.h5") as f:
        assert not f.attrs["finished"] and not f.attrs["success_reported"]
        assert f["weight"][()].tolist() == [0.5] * 3
