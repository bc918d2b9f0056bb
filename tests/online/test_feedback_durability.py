"""The feedback log under faults: power loss (unsynced writes dropped), a bit flip mid-segment, a full
disk (a real tmpfs, and an injected ENOSPC), bounded startup recovery, retention over a long posting
run, and assembly quarantining episodes training cannot use.

The power-loss layer (`PowerLossDisk`) wraps `os.fsync` and `os.ftruncate` for files under one folder.
It keeps what a POSIX file system guarantees after a crash and nothing more: a file's bytes as of its
last completed fsync (found by inode, so renames are followed), and a folder's entries as of its last
fsync (a new name is only durable once its directory is fsynced). A crash image is rebuilt from that,
plus a random prefix of each file's unsynced bytes (write-back may have started: torn tails). A
truncate is assumed to reach the disk at once (metadata may be written before any fsync), which is
the worst case for "copy, then truncate". Real kernels keep at least this much, so a record missing
from the image could be missing after a real power cut.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobile_vla.errors import DataError
from mobile_vla.online.feedback_record import FRAME_SIZE, normalise_record
from mobile_vla.online.feedback_store import FeedbackStore, StorageFullError
from mobile_vla.online.inspect_feedback import describe_feedback
from mobile_vla.online.wal import SegmentWriter, encode_frame, read_segment, scan_segment


def jpeg(value: int, size: int = FRAME_SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def noise_png(side: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def record(robot: str, episode: str, step: int, done: bool = False, image: bytes | None = None, **extra) -> dict:
    return {
        "robot_id": robot,
        "episode_id": episode,
        "step": step,
        "instruction": "go to the red box",
        "image": image if image is not None else jpeg(step),
        "state": [0.0, 0.0, 0.0],
        "action_executed": [0.3, 0.0, 0.1],
        "episode_done": done,
        "success": True if done else None,
        **extra,
    }


def key_of(meta: dict) -> str:
    return f"{meta['robot_id']}/{meta['episode_id']}/{meta['step']}"


def stored_keys(root: Path) -> set[str]:
    return {key_of(r.meta) for r in FeedbackStore(root, repair=False).replay()}


# --------------------------------------------------------------------------------- the power-loss layer
class PowerLossDisk:
    """What survives a power cut under `top` (module docstring): durable bytes per inode, durable names
    per folder, captured at each fsync; `image(dest)` rebuilds the folder as a crash would leave it.
    """

    def __init__(self, top: Path, seed: int = 0):
        self.top = str(top)
        self.contents: dict[int, bytes] = {}  # inode -> bytes as of its last fsync
        self.names: dict[str, dict[str, tuple[int, bool]]] = {}  # folder -> name -> (inode, is folder)
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.on_truncate = []  # callbacks(path, inode, length) before a truncate
        self.on_fsync = []  # callbacks() after an fsync was recorded
        self._fsync, self._ftruncate = os.fsync, os.ftruncate

    def install(self, monkeypatch) -> PowerLossDisk:
        monkeypatch.setattr(os, "fsync", self.fsync)
        monkeypatch.setattr(os, "ftruncate", self.ftruncate)
        return self

    def _path(self, fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fsync(self, fd: int) -> None:
        path = self._path(fd)
        if path.startswith(self.top):
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                entries = {e.name: (e.inode(), e.is_dir(follow_symlinks=False)) for e in os.scandir(path)}
                with self.lock:
                    self.names[path] = entries
            else:
                with open(f"/proc/self/fd/{fd}", "rb") as handle:  # what was written before the fsync began
                    data = handle.read()
                with self.lock:
                    self.contents[info.st_ino] = data
        self._fsync(fd)
        for callback in self.on_fsync:
            callback()

    def ftruncate(self, fd: int, length: int) -> None:
        path = self._path(fd)
        if path.startswith(self.top):
            inode = os.fstat(fd).st_ino
            for callback in self.on_truncate:
                callback(path, inode, length)
        self._ftruncate(fd, length)

    def state(self, truncated: dict[int, int] | None = None) -> tuple[dict, dict, dict]:
        """A crash now: (durable names, durable contents with `truncated` applied, current bytes)."""
        with self.lock:
            names = {k: dict(v) for k, v in self.names.items()}
            contents = dict(self.contents)
        current = {}
        for folder, entries in names.items():
            for name, (inode, is_dir) in entries.items():
                path = os.path.join(folder, name)
                if not is_dir and os.path.isfile(path) and os.stat(path).st_ino == inode:
                    current[inode] = Path(path).read_bytes()
        for inode, length in (truncated or {}).items():
            contents[inode] = contents.get(inode, b"")[:length]
            current[inode] = current.get(inode, b"")[:length]
        return names, contents, current

    def image(self, dest: Path, state=None) -> Path:
        """Rebuilds `top` as the crash `state` (default: now) leaves it, at `dest`."""
        names, contents, current = state or self.state()

        def build(folder: str, out: Path) -> None:
            out.mkdir(parents=True, exist_ok=True)
            for name, (inode, is_dir) in names.get(folder, {}).items():
                if is_dir:
                    build(os.path.join(folder, name), out / name)
                    continue
                data = contents.get(inode, b"")
                now = current.get(inode, data)
                if now.startswith(data) and len(now) > len(data):  # write-back may have begun: a torn tail
                    data = now[: len(data) + self.rng.randrange(len(now) - len(data) + 1)]
                (out / name).write_bytes(data)

        build(self.top, dest)
        return dest


def test_power_loss_during_concurrent_appends_loses_no_acknowledged_record(tmp_path, monkeypatch):
    disk = PowerLossDisk(tmp_path / "disk").install(monkeypatch)
    (tmp_path / "disk").mkdir()
    root = tmp_path / "disk" / "feedback"  # a fresh root: its own name must be made durable too
    store = FeedbackStore(root, segment_max_bytes=60_000)  # rotation under load
    acked, stop = [], threading.Event()
    lock = threading.Lock()

    def robot(index: int) -> None:
        step = 0
        while not stop.is_set():
            store.append(record(f"r{index}", "e0", step, image=jpeg(step * 7 + index, 64)))
            with lock:
                acked.append(f"r{index}/e0/{step}")
            step += 1

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    crashes = []
    try:
        for _ in range(4):  # power cuts at four moments while the robots keep posting
            time.sleep(0.4)
            with lock:
                acknowledged = set(acked)  # everything acknowledged before the cut
            crashes.append((acknowledged, disk.state()))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(acked) > 40, "the robots barely posted"
    for number, (acknowledged, state) in enumerate(crashes):
        image = disk.image(tmp_path / f"after-{number}", state)
        survivors = {key_of(r.meta) for r in FeedbackStore(image / "feedback").replay()}  # restart (repairs)
        lost = acknowledged - survivors
        assert not lost, f"power cut {number}: {len(lost)} acknowledged records lost, e.g. {sorted(lost)[:3]}"
        assert all(s.problem is None for s in FeedbackStore(image / "feedback", repair=False).scan())


def test_power_loss_during_repair_never_loses_the_cut_tail(tmp_path, monkeypatch):
    disk = PowerLossDisk(tmp_path / "disk").install(monkeypatch)
    root = tmp_path / "disk" / "feedback"
    root.parent.mkdir()
    with FeedbackStore(root) as writer:
        for step in range(5):
            writer.append(record("r", "e", step))
    (segment,) = (root / "segments").glob("*.wal")
    meta, image = normalise_record(record("r", "torn", 0))
    frame = encode_frame(meta, image)
    tail = frame[: len(frame) // 2]  # a dead writer's half-written frame, already on disk
    with open(segment, "ab") as handle:
        handle.write(tail)
        handle.flush()
        os.fsync(handle.fileno())
    inode = segment.stat().st_ino
    quarantine = str(root / "quarantine")

    def tail_survives(state) -> bool:
        """The torn bytes are still in the segment, or in a durable quarantine copy with a durable name."""
        names, contents, _ = state
        if contents.get(inode, b"").endswith(tail):
            return True
        if "quarantine" not in names.get(str(root), {}):
            return False
        return tail in [contents.get(i, b"") for i, _ in names.get(quarantine, {}).values()]

    checked = []

    def at_truncate(path, truncated_inode, length):  # the truncate may reach the disk at once
        checked.append(tail_survives(disk.state({truncated_inode: length})))

    disk.on_truncate.append(at_truncate)
    disk.on_fsync.append(lambda: checked.append(tail_survives(disk.state())))
    FeedbackStore(root)  # restart: repair cuts the tail
    assert checked and all(checked), f"a crash during repair would lose the cut bytes (checks: {checked})"
    assert scan_segment(segment).problem is None


# ------------------------------------------------------------------------------------------ bit flips
@pytest.mark.parametrize("where", ["image", "length", "magic"])
def test_a_bit_flip_mid_segment_loses_only_that_record(tmp_path, where):
    root = tmp_path / "feedback"
    with FeedbackStore(root) as store:
        for step in range(30):
            store.append(record("r", "e", step, done=step == 29))
    (segment,) = (root / "segments").glob("*.wal")
    victim = next(r for r in read_segment(segment) if r.meta["step"] == 15)
    position = {"image": victim.end - 10, "length": victim.offset + 5, "magic": victim.offset + 1}[where]
    data = bytearray(segment.read_bytes())
    data[position] ^= 0x10
    segment.write_bytes(bytes(data))

    assert stored_keys(root) == {f"r/e/{s}" for s in range(30) if s != 15}
    scan = scan_segment(segment)
    assert scan.records == 29 and scan.problem is None
    assert [(start, end) for start, end, _ in scan.skipped] == [(victim.offset, victim.end)]
    assert describe_feedback(root)["torn_or_corrupt"][0]["at_byte"] == victim.offset
    result = FeedbackStore(root).assemble_episodes(tmp_path / "out", stale_after_s=None)
    assert result.episodes == ["fb_r_e.h5"] and not result.summary.quarantined


# ------------------------------------------------------------------------------------------ disk full
class FullDisk:
    """Injected ENOSPC for writes to segment files under `top` while `full` is set."""

    def __init__(self, top: Path):
        self.top, self.full, self.refused = str(top), False, 0
        self._write = os.write

    def write(self, fd: int, data) -> int:
        if self.full and os.readlink(f"/proc/self/fd/{fd}").startswith(self.top):
            self.refused += 1
            half = len(data) // 2  # a partial write, then the error: the worst case
            if half and self.refused % 2:
                self._write(fd, bytes(data[:half]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._write(fd, data)


def test_injected_enospc_answers_storage_full_leaves_no_litter_and_recovers(tmp_path, monkeypatch):
    root = tmp_path / "feedback"
    disk = FullDisk(root / "segments")
    monkeypatch.setattr(os, "write", disk.write)
    store = FeedbackStore(root)
    disk.full = True
    for step in range(5):  # a robot retrying on a fresh store: no segment may be left behind
        with pytest.raises(StorageFullError, match="no space left") as raised:
            store.append(record("r", "e", step))
        assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)
    assert list((root / "segments").glob("*.wal")) == []
    disk.full = False
    store.append(record("r", "e", 0))
    disk.full = True
    for step in range(1, 6):
        with pytest.raises(StorageFullError):
            store.append(record("r", "e", step))
    segments = list((root / "segments").glob("*.wal"))
    assert len(segments) == 1 and scan_segment(segments[0]).problem is None  # no partial frame left
    disk.full = False  # space freed: the same store goes on
    for step in range(1, 4):
        store.append(record("r", "e", step, done=step == 3))
    assert stored_keys(root) == {f"r/e/{s}" for s in range(4)}
    assert len(list((root / "segments").glob("*.wal"))) == 1


def test_a_full_disk_at_startup_keeps_the_torn_tail_for_later_and_the_store_opens(tmp_path, monkeypatch):
    # An ingress restart (or the online update, which frees space) on a full disk with a dead writer's
    # torn tail: the quarantine copy cannot be written, so the tail stays where readers stop at it.
    root = tmp_path / "feedback"
    with FeedbackStore(root) as writer:
        for step in range(3):
            writer.append(record("r", "e", step))
    (segment,) = (root / "segments").glob("*.wal")
    frame = encode_frame(*normalise_record(record("r", "torn", 0)))
    with open(segment, "ab") as handle:
        handle.write(frame[: len(frame) // 2])  # a dead writer's half-written frame
    size = segment.stat().st_size
    disk = FullDisk(root)  # every write under the feedback root, the quarantine copy included
    monkeypatch.setattr(os, "write", disk.write)
    disk.full = True
    for _ in range(2):  # the first refusal writes half the copy first (FullDisk): no partial copy may stay
        store = FeedbackStore(root)
        assert segment.stat().st_size == size and [p.name for p in (root / "quarantine").glob("*")] == []
    assert disk.refused >= 2 and stored_keys(root) == {"r/e/0", "r/e/1", "r/e/2"}
    with pytest.raises(StorageFullError):
        store.append(record("r", "e", 3))
    disk.full = False  # space freed: the next start cuts the tail to quarantine/ as usual
    FeedbackStore(root).append(record("r", "e", 3))
    assert scan_segment(segment).problem is None and len(list((root / "quarantine").glob("*.torn"))) == 1
    assert stored_keys(root) == {f"r/e/{s}" for s in range(4)}


TMPFS_WRITER = textwrap.dedent(
    """
    import json, os, sys
    from mobile_vla.online.feedback_store import FeedbackStore, StorageFullError
    mount, image = sys.argv[1], open(sys.argv[2], "rb").read()
    ballast = os.path.join(mount, "ballast")
    with open(ballast, "wb") as handle:
        handle.write(os.urandom(256 * 1024))
    store = FeedbackStore(os.path.join(mount, "feedback"))
    def post(step):
        store.append({"robot_id": "r", "episode_id": "e", "step": step, "instruction": "go", "image": image,
                      "state": [0.0], "action_executed": [0.1, 0.0, 0.0]})
    acked, errors, step = [], [], 0
    while len(errors) < 3:
        try:
            post(step); acked.append(step)
        except StorageFullError as exc:
            errors.append([exc.errno, str(exc)])
        step += 1
    segments = sorted(os.listdir(os.path.join(mount, "feedback", "segments")))
    sizes = [os.path.getsize(os.path.join(mount, "feedback", "segments", s)) for s in segments]
    os.remove(ballast)  # an operator frees space
    post(step); acked.append(step)
    kept = sorted(r.meta["step"] for r in FeedbackStore(os.path.join(mount, "feedback"), repair=False).replay())
    print(json.dumps({"acked": acked, "errors": errors, "sizes_when_full": sizes, "kept": kept}))
    """
)


def test_a_full_tmpfs_answers_storage_full_and_recovers_when_space_is_freed(tmp_path):
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0
    if not probe:
        pytest.skip("no unprivileged mount namespace here (unshare -rm): the injected-ENOSPC test covers it")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    (tmp_path / "frame.png").write_bytes(noise_png(FRAME_SIZE))  # ~150 KB: stored as sent (224x224)
    script = f'mount -t tmpfs -o size=1m tmpfs "$1" && exec "{sys.executable}" -c "$2" "$1" "$3"'
    done = subprocess.run(
        [unshare, "-rm", "sh", "-c", script, "sh", str(mount), TMPFS_WRITER, str(tmp_path / "frame.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["errors"] and all(code == errno.ENOSPC for code, _ in result["errors"])
    assert "no space left" in result["errors"][0][1]
    assert result["sizes_when_full"] and 0 not in result["sizes_when_full"], "an empty segment was left behind"
    assert result["kept"] == result["acked"]  # every acknowledged record, the one after freeing space included


# ------------------------------------------------------------------------------ bounded recovery
def read_bytes_so_far() -> int:
    """This process's rchar: bytes its read system calls returned (page cache included)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def test_startup_recovery_reads_segment_tails_not_the_log(tmp_path):
    root = tmp_path / "feedback"
    (root / "segments").mkdir(parents=True)
    payload = os.urandom(20_000)  # about a normalised frame
    for writer_number in range(4):  # four dead writers' segments, 8 MB each
        frames = [
            encode_frame({"robot_id": f"r{writer_number}", "episode_id": "e", "step": step}, payload)
            for step in range(400)
        ]
        (root / "segments" / f"host-{writer_number}-dead-00001.wal").write_bytes(b"".join(frames))
    last = sorted((root / "segments").glob("*.wal"))[-1]
    with open(last, "ab") as handle:
        handle.write(encode_frame({"robot_id": "x", "episode_id": "torn", "step": 0}, payload)[:5000])
    log_bytes = sum(p.stat().st_size for p in (root / "segments").glob("*.wal"))

    before = read_bytes_so_far()
    store = FeedbackStore(root)  # an ingress start
    read = read_bytes_so_far() - before
    assert read < log_bytes / 20, f"startup read {read} of {log_bytes} log bytes"
    assert [s.name for s in store.repair()] == [] and scan_segment(last).problem is None  # the tail was cut
    assert list((root / "quarantine").glob("*.torn"))


# ------------------------------------------------------------------------------------------ retention
def test_retention_keeps_disk_use_bounded_over_a_long_posting_run(tmp_path):
    root = tmp_path / "feedback"
    store = FeedbackStore(root, segment_max_bytes=32 * 1024)
    update = FeedbackStore(root, repair=False)  # the online update's side
    frame = jpeg(1)  # 224x224: stored as sent
    per_update, episodes_per_round, steps = 500, 50, 10
    peak, posted, retired_earlier, retired_last = 0, 0, set(), set()

    def disk_use() -> int:
        return sum(p.stat().st_size for p in (root / "segments").glob("*.wal"))

    for round_number in range(6):  # 3,000 records, an update after every 500
        for i in range(per_update):
            episode, step = divmod(i, steps)
            store.append(record(f"r{episode % 7}", f"x{round_number}-{episode}", step, step == steps - 1, frame))
            posted += 1
        peak = max(peak, disk_use())  # the most the log holds: one update's worth, not the whole run
        cursor = update.load_cursor()
        pending = update.pending_episodes(cursor)
        assert len(pending) == episodes_per_round  # nothing of this round was deleted before it was used
        update.commit_cursor(update.advance_cursor(cursor, set(pending)))
        retired_earlier |= retired_last
        retired_last = set(update.retire(keep_consumed_s=0))
        assert retired_last
        assert disk_use() <= 32 * 1024  # the live writer's open segment at most
    record_bytes = len(encode_frame(*normalise_record(record("r0", "x", 0, image=frame))))
    posted_bytes = posted * record_bytes
    assert peak < 1.2 * per_update * record_bytes + 32 * 1024, (peak, posted_bytes)
    assert peak < posted_bytes / 4  # without retirement the log would hold all 3,000 records
    assert len(list((root / "segments").glob("*.wal"))) <= 1  # only the live writer's open segment
    assert not set(update.load_cursor().offsets) & retired_earlier  # the next commit forgets retired segments
    store.append(record("r0", "late", 0, True, frame))  # the store keeps working; nothing new was lost
    assert {r.meta["episode_id"] for r in update.replay(update.load_cursor())} == {"late"}


def test_retention_keeps_recent_segments_for_keep_consumed_s(tmp_path):
    root = tmp_path / "feedback"
    with FeedbackStore(root) as store:
        store.append(record("r", "e", 0, done=True))
    cursor = store.advance_cursor(store.load_cursor(), {"r/e"})
    store.commit_cursor(cursor)
    assert store.retire(keep_consumed_s=3600) == []
    assert len(store.retire(keep_consumed_s=0)) == 1
    assert list((root / "segments").glob("*.wal")) == []


# ------------------------------------------------------------------------------------------ assembly
def raw_append(writer: SegmentWriter, meta: dict, image: bytes) -> None:
    """A record as an older or foreign writer may have stored it: no checks, no normalisation."""
    writer.append(encode_frame({"received_at": time.time(), "state": [0.0, 0.0, 0.0], **meta}, image))


def huge_flat_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 4000), (10, 20, 30)).save(buffer, format="PNG")  # ~60 KB, 20 M pixels
    return buffer.getvalue()


def test_assembly_quarantines_bad_episodes_finishes_and_advances_the_cursor(tmp_path):
    root = tmp_path / "feedback"
    writer = SegmentWriter(root, root / "segments", 64 * 1024 * 1024)
    good = {"instruction": "go to the red box", "action_executed": [0.3, 0.0, 0.1], "episode_done": False}
    bad = {
        "inf": ({"action_executed": [1e39, 0.0, 0.0]}, jpeg(1)),
        "nul": ({"instruction": "go to the red\x00box"}, jpeg(2)),
        "wordy": ({"instruction": "go " * 80}, jpeg(3)),
        "huge": ({}, huge_flat_png()),
    }
    for name, (override, image) in {"ok": ({}, jpeg(0)), **bad}.items():
        for step in range(3):
            meta = {**good, "robot_id": "r", "episode_id": name, "step": step, "episode_done": step == 2, **override}
            raw_append(writer, meta, image if step == 1 else jpeg(step))
    writer.close()

    def tokenizer_check(text: str) -> None:  # stands for the champion's tokenizer (test_online_update: the real one)
        if len(text.split()) > 40:
            raise DataError(f"instruction {text[:20]!r} has {len(text.split())} tokens, more than 40")

    store = FeedbackStore(root)
    result = store.assemble_episodes(tmp_path / "out", stale_after_s=None, check_instruction=tokenizer_check)
    assert result.episodes == ["fb_r_ok.h5"]
    assert set(result.summary.quarantined) == {f"r/{name}" for name in bad}
    assert "float32" in result.summary.quarantined["r/inf"] and "NUL" in result.summary.quarantined["r/nul"]
    assert "pixel budget" in result.summary.quarantined["r/huge"]
    assert "tokens" in result.summary.quarantined["r/wordy"]
    entry = json.loads((root / "quarantine" / "episodes" / "r_inf.json").read_text())
    assert entry["key"] == "r/inf" and len(entry["steps"]) == 3

    # A rejected update commits only the quarantined episodes: they never come back, the good one waits.
    store.commit_cursor(result.quarantine_cursor)
    again = store.assemble_episodes(tmp_path / "again", stale_after_s=None, check_instruction=tokenizer_check)
    assert again.episodes == ["fb_r_ok.h5"] and not again.summary.quarantined


def test_frames_are_normalised_to_224_at_write(tmp_path):
    root = tmp_path / "feedback"
    wide = io.BytesIO()
    Image.fromarray(np.full((720, 1280, 3), 200, dtype=np.uint8)).save(wide, format="JPEG")
    with FeedbackStore(root) as store:
        store.append(record("r", "e", 0, image=wide.getvalue()))
        store.append(record("r", "e", 1, image=jpeg(5)))  # already 224x224: stored byte for byte
        with pytest.raises(DataError, match="pixel budget"):
            store.append(record("r", "e", 2, image=huge_flat_png()))
        with pytest.raises(DataError, match="float32"):
            store.append(record("r", "e", 3, action_executed=[1e39, 0.0, 0.0]))
    first, second = list(store.replay())
    with Image.open(io.BytesIO(first.image)) as image:
        assert image.size == (FRAME_SIZE, FRAME_SIZE) and image.format == "JPEG"
        assert np.asarray(image)[112, 112, 0] > 150 and np.asarray(image)[2, 112, 0] < 140  # letterbox bars
    assert first.meta["image_source_size"] == [1280, 720] and len(first.image) < len(wide.getvalue())
    assert second.image == jpeg(5)
