"""Durable fleet feedback: a write-ahead log of /v1/feedback steps, assembled into episodes for training.

    store = FeedbackStore("$MOBILE_VLA_HOME/feedback")
    store.append(record)                      # durable when it returns: the API may answer 202
    result = store.assemble_episodes("data/feedback-7")   # complete episodes -> episode files + manifest
    store.commit_cursor(result.cursor)        # once the update that used them has finished

Layout under root:
    segments/<host>-<pid>-<tag>-<seq>.wal   one append-only file per writer process (never shared)
    cursor.json                              what earlier updates already consumed (the watermark)
    quarantine/                              torn tails cut off dead writers' segments, kept for forensics

A record on disk is `MAGIC | payload length (u32) | crc32(payload) (u32) | payload`, with payload =
`meta length (u32) | meta JSON | image bytes` (the JPEG/PNG exactly as the robot sent it: no decode or
re-encode in the request path). `append` writes the whole frame, then fsyncs; concurrent appends in
one process share fsyncs (group commit), so throughput does not collapse to one fsync per request.
A kill -9 can leave at most one torn frame at the end of that writer's segment: readers detect it by
length and checksum and stop there; the next writer started on the same root cuts it off (to
quarantine/) once the dead writer's file lock is gone. Every acknowledged record precedes the tear.

Why per-writer segments: Serve replicas are separate processes; one file per writer needs no
cross-process locking on the hot path, and a crash can only tear the file of the writer that crashed.
Steps of one episode may land in several segments (any replica serves any robot): assembly groups by
(robot_id, episode_id), orders by step and keeps the last copy of a retried step.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import math
import os
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from mobile_vla.config import StrictModel
from mobile_vla.errors import DataError

log = logging.getLogger(__name__)

MAGIC = b"MVF1"
HEADER = struct.Struct(">4sII")  # magic, payload length, crc32(payload)
META_LEN = struct.Struct(">I")
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a frame claiming more is corruption, not a record
SEGMENT_SUFFIX = ".wal"
CURSOR_NAME = "cursor.json"
ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
IMAGE_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


# --------------------------------------------------------------------------------------------- records
def _check_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or value[0] in "._-" or len(value) > 128 or set(value) - ID_CHARS:
        raise DataError(f"feedback record: {name} = {value!r}: expected letters, digits, '.', '_', '-' (max 128)")
    return value


def _check_vector(name: str, value: Any, length: int | None = None) -> list[float]:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        want = f"{length} numbers" if length is not None else "a list of numbers"
        raise DataError(f"feedback record: {name} = {value!r}: expected {want}")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise DataError(f"feedback record: {name} = {value!r}: every value must be a finite number")
        out.append(float(item))
    return out


def image_format(data: bytes) -> str:
    for magic, name in IMAGE_MAGIC.items():
        if data.startswith(magic):
            return name
    raise DataError(f"feedback record: image: {data[:8]!r}...: expected JPEG or PNG bytes")


def normalise_record(record: Mapping[str, Any]) -> tuple[dict, bytes]:
    """Checks one step (whatever the HTTP layer already checked, for other callers too) and splits it
    into JSON meta and the raw image bytes. `image` may be bytes or base64 text (the API body).
    """
    if hasattr(record, "model_dump"):
        record = record.model_dump()
    meta = {k: v for k, v in record.items() if k != "image"}
    image = record.get("image")
    if isinstance(image, str):
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise DataError("feedback record: image: not valid base64") from None
    if not isinstance(image, (bytes, bytearray, memoryview)) or not image:
        raise DataError(f"feedback record: image: {type(image).__name__}: expected JPEG/PNG bytes or base64 text")
    image = bytes(image)
    meta["image_format"] = image_format(image)
    _check_id("robot_id", meta.get("robot_id"))
    _check_id("episode_id", meta.get("episode_id"))
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DataError(f"feedback record: step = {step!r}: expected an integer >= 0")
    instruction = meta.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"feedback record: instruction = {instruction!r}: expected non-empty text")
    meta["state"] = _check_vector("state", meta.get("state", []))
    meta["action_executed"] = _check_vector("action_executed", meta.get("action_executed"), 3)
    if meta.get("action_corrected") is not None:
        meta["action_corrected"] = _check_vector("action_corrected", meta["action_corrected"], 3)
    for flag in ("intervention", "episode_done"):
        if not isinstance(meta.setdefault(flag, False), bool):
            raise DataError(f"feedback record: {flag} = {meta[flag]!r}: expected true or false")
    if meta.setdefault("success", None) is not None and not isinstance(meta["success"], bool):
        raise DataError(f"feedback record: success = {meta['success']!r}: expected true, false or null")
    meta.setdefault("received_at", time.time())
    return meta, image


def encode_frame(meta: dict, image: bytes) -> bytes:
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload = META_LEN.pack(len(meta_bytes)) + meta_bytes + image
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass
class StoredRecord:
    meta: dict
    image: bytes
    segment: str
    offset: int  # where the frame starts
    end: int  # where the next one starts

    @property
    def episode_key(self) -> str:
        return f"{self.meta['robot_id']}/{self.meta['episode_id']}"


@dataclass
class SegmentScan:
    name: str
    size: int
    valid_end: int  # bytes up to here are whole, checksummed frames
    records: int
    problem: str | None = None  # why reading stopped before the end (torn tail or corruption)


def read_segment(path: Path, start: int = 0, scan: SegmentScan | None = None) -> Iterator[StoredRecord]:
    """Valid records of one segment from `start`; stops cleanly at the first torn or corrupt frame
    (filling `scan.problem`). A frame still being written by a live writer looks the same: not yet a record.
    """
    with open(path, "rb") as handle:
        handle.seek(start)
        offset = start
        while True:
            header = handle.read(HEADER.size)
            problem = None
            if not header:
                break
            if len(header) < HEADER.size:
                problem = f"torn header at byte {offset} ({len(header)} of {HEADER.size} bytes)"
            else:
                magic, length, crc = HEADER.unpack(header)
                if magic != MAGIC or length > MAX_RECORD_BYTES or length < META_LEN.size:
                    problem = f"bad frame header at byte {offset} (magic {magic!r}, length {length})"
                else:
                    payload = handle.read(length)
                    if len(payload) < length:
                        problem = f"torn record at byte {offset} ({len(payload)} of {length} payload bytes)"
                    elif zlib.crc32(payload) != crc:
                        problem = f"checksum mismatch at byte {offset}"
            if problem:
                if scan is not None:
                    scan.problem = problem
                break
            (meta_len,) = META_LEN.unpack_from(payload)
            try:
                meta = json.loads(payload[META_LEN.size : META_LEN.size + meta_len])
            except (UnicodeDecodeError, json.JSONDecodeError):  # crc matched, so the writer wrote this: a bug
                if scan is not None:
                    scan.problem = f"unreadable meta at byte {offset}"
                break
            end = offset + HEADER.size + length
            if scan is not None:
                scan.valid_end, scan.records = end, scan.records + 1
            yield StoredRecord(meta, payload[META_LEN.size + meta_len :], path.name, offset, end)
            offset = end


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- writer
@dataclass
class _Segment:
    path: Path
    fd: int
    written: int = 0  # bytes whose write() completed
    synced: int = 0  # bytes known to be on disk
    broken: bool = False


class FeedbackStore:
    """Satisfies `mobile_vla.serve.feedback_sink.FeedbackSink`: `append(record)` returns once durable.

    Thread-safe within a process; one instance per process (each owns its own segment files).
    """

    def __init__(self, root: str | Path, segment_max_bytes: int = 64 * 1024 * 1024, repair: bool = True):
        self.root = Path(root).expanduser()
        self.segments_dir = self.root / "segments"
        self.segment_max_bytes = segment_max_bytes
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._seq = 0
        self._segment: _Segment | None = None
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._pid = os.getpid()
        if repair and self.segments_dir.is_dir():
            self.repair()

    # -- appending ------------------------------------------------------------------------------------
    def append(self, record: Mapping[str, Any]) -> None:
        """Stores one step; returns only when it is fsynced. Raises DataError on a bad record, OSError
        when the disk refuses (then nothing is acknowledged; a retry goes to a fresh segment).
        """
        meta, image = normalise_record(record)
        frame = encode_frame(meta, image)
        with self._write_lock:
            segment = self._active_segment(len(frame))
            start = segment.written
            try:
                _write_all(segment.fd, frame)
            except OSError:
                self._abandon(segment, truncate_to=start)
                raise
            segment.written += len(frame)
            end = segment.written
        self._sync(segment, end)

    def _active_segment(self, incoming: int) -> _Segment:
        if os.getpid() != self._pid:
            raise RuntimeError("FeedbackStore used across fork: create one per process")
        current = self._segment
        if current is not None and current.written + incoming > self.segment_max_bytes and current.written > 0:
            self._close_segment(current)
            current = None
        if current is None:
            current = self._segment = self._open_segment()
        return current

    def _open_segment(self) -> _Segment:
        fresh_dir = not self.segments_dir.is_dir()
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        if fresh_dir:
            _fsync_dir(self.root)
        self._seq += 1
        path = self.segments_dir / f"{self.writer_id}-{self._seq:05d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "a live writer owns this": repair keeps off
        _fsync_dir(self.segments_dir)  # the new name itself must survive a crash
        return _Segment(path, fd)

    def _sync(self, segment: _Segment, end: int) -> None:
        with self._sync_lock:
            if segment.synced >= end:
                return  # another thread's fsync covered this record
            if segment.broken:
                raise OSError(f"{segment.path}: segment abandoned before this record was synced")
            target = segment.written
            try:
                os.fsync(segment.fd)
            except OSError:
                segment.broken = True  # after a failed fsync the page cache cannot be trusted
                self._forget(segment)
                raise
            segment.synced = target

    def _abandon(self, segment: _Segment, truncate_to: int) -> None:
        """A failed write: cut back to the last whole frame so the file stays valid, then move on."""
        with self._sync_lock:
            try:
                os.ftruncate(segment.fd, truncate_to)
                os.fsync(segment.fd)
                segment.synced = segment.written = truncate_to
            except OSError:
                segment.broken = True
            self._forget(segment)

    def _forget(self, segment: _Segment) -> None:
        if self._segment is segment:
            self._segment = None
        try:
            os.close(segment.fd)
        except OSError:
            pass

    def _close_segment(self, segment: _Segment) -> None:
        with self._sync_lock:
            os.fsync(segment.fd)
            segment.synced = segment.written
            self._forget(segment)

    def close(self) -> None:
        with self._write_lock:
            if self._segment is not None:
                self._close_segment(self._segment)

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- recovery and reading -------------------------------------------------------------------------
    def segment_paths(self) -> list[Path]:
        if not self.segments_dir.is_dir():
            return []
        return sorted(p for p in self.segments_dir.iterdir() if p.suffix == SEGMENT_SUFFIX)

    def repair(self) -> list[SegmentScan]:
        """Cuts torn tails off segments whose writer is gone (its flock released), moving the cut bytes
        to quarantine/. Segments of live writers are left alone. Returns what was cut.
        """
        repaired = []
        for path in self.segment_paths():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer
                scan = SegmentScan(path.name, os.fstat(fd).st_size, 0, 0)
                for _ in read_segment(path, 0, scan):
                    pass
                if scan.valid_end < scan.size:
                    quarantine = self.root / "quarantine"
                    quarantine.mkdir(exist_ok=True)
                    os.lseek(fd, scan.valid_end, os.SEEK_SET)
                    tail = os.read(fd, scan.size - scan.valid_end)
                    (quarantine / f"{path.name}.{scan.valid_end}.torn").write_bytes(tail)
                    os.ftruncate(fd, scan.valid_end)
                    os.fsync(fd)
                    log.warning("feedback %s: %s; cut %d bytes to quarantine/", path.name, scan.problem, len(tail))
                    repaired.append(scan)
            finally:
                os.close(fd)
        return repaired

    def scan(self) -> list[SegmentScan]:
        """Per segment: size, valid bytes, records, and why reading stopped early (if it did)."""
        scans = []
        for path in self.segment_paths():
            scan = SegmentScan(path.name, path.stat().st_size, 0, 0)
            for _ in read_segment(path, 0, scan):
                pass
            scans.append(scan)
        return scans

    def replay(self, cursor: Cursor | None = None) -> Iterator[StoredRecord]:
        """Every valid record (after `cursor`'s watermark when given), segment by segment."""
        offsets = cursor.offsets if cursor else {}
        consumed = set(cursor.consumed) if cursor else set()
        for path in self.segment_paths():
            for stored in read_segment(path, offsets.get(path.name, 0)):
                if stored.episode_key not in consumed:
                    yield stored

    # -- the watermark --------------------------------------------------------------------------------
    def load_cursor(self) -> Cursor:
        path = self.root / CURSOR_NAME
        if not path.is_file():
            return Cursor()
        try:
            data = json.loads(path.read_text())
            return Cursor(
                offsets=dict(data["offsets"]), consumed=list(data["consumed"]), history=list(data.get("history", []))
            )
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: unreadable feedback cursor ({exc}); fix or remove it to reprocess all") from None

    def commit_cursor(self, cursor: Cursor, note: dict | None = None) -> None:
        """Atomically records that the episodes behind `cursor` were used (tmp + fsync + rename)."""
        path = self.root / CURSOR_NAME
        history = (cursor.history + [{"time": time.time(), **(note or {})}])[-100:]
        data = {"offsets": cursor.offsets, "consumed": cursor.consumed, "history": history}
        tmp = path.with_name(f".{CURSOR_NAME}.{os.getpid()}.tmp")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.root)

    # -- assembly -------------------------------------------------------------------------------------
    def pending_episodes(self, cursor: Cursor | None = None) -> dict[str, dict[int, StoredRecord]]:
        """Episode key -> {step: last stored copy}, for records not consumed by an earlier update."""
        episodes: dict[str, dict[int, StoredRecord]] = {}
        for stored in self.replay(cursor):
            steps = episodes.setdefault(stored.episode_key, {})
            step = int(stored.meta["step"])
            earlier = steps.get(step)  # a retry may sit in another replica's segment: latest receipt wins
            if earlier is None or float(stored.meta["received_at"]) >= float(earlier.meta["received_at"]):
                steps[step] = stored
        return episodes

    def assemble_episodes(
        self,
        out_dir: str | Path,
        weights: FeedbackWeights | None = None,
        since_last_update: bool = True,
        stale_after_s: float | None = 3600.0,
        control_hz: float = 5.0,
        val_fraction: float = 0.0,
        progress: bool = False,
    ) -> AssembleResult:
        """Writes one episode file per finished (robot_id, episode_id), labelled with the operator's
        correction where there is one, plus per-step `weight`, `intervention`, `corrected` and
        `action_executed` arrays, and a manifest. Unfinished episodes wait unless their last step is
        older than `stale_after_s`. Returns the cursor to commit once the files have been used.
        """
        from mobile_vla.data.manifest import build_manifest, split_names

        weights = weights or FeedbackWeights()
        cursor = self.load_cursor() if since_last_update else Cursor()
        episodes = self.pending_episodes(cursor)
        now = time.time()
        ready, waiting = {}, []
        for key, steps in episodes.items():
            done = any(s.meta.get("episode_done") for s in steps.values())
            last_seen = max(float(s.meta.get("received_at", 0.0)) for s in steps.values())
            stale = stale_after_s is not None and now - last_seen > stale_after_s
            if done or stale:
                ready[key] = steps
            else:
                waiting.append(key)

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names, summary = [], FeedbackSummary()
        keys = sorted(ready)
        if progress:
            from rich.progress import track

            keys = track(keys, description="assembling feedback episodes", transient=True)
        for key in keys:
            name = write_feedback_episode(out_dir, key, ready[key], weights, control_hz, summary)
            if name:
                names.append(name)
        if names:
            splits = (
                split_names(names, {"train": 1 - val_fraction, "val": val_fraction})
                if val_fraction
                else {"train": names}
            )
            splits = {k: v for k, v in splits.items() if v}
            build_manifest(
                out_dir, splits, generator={"kind": "feedback", "root": str(self.root), "weights": weights.model_dump()}
            )
        new_cursor = advance_cursor(self, cursor, set(ready))
        return AssembleResult(out_dir, names, waiting, new_cursor, summary)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"write returned {written}")
        view = view[written:]


# ------------------------------------------------------------------------------- cursor and assembly
@dataclass
class Cursor:
    """Per segment, the byte offset before which every record belongs to a consumed episode; plus the
    consumed episodes that still have records after those offsets (steps interleave across episodes).
    """

    offsets: dict[str, int] = field(default_factory=dict)
    consumed: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def advance_cursor(store: FeedbackStore, cursor: Cursor, newly_consumed: set[str]) -> Cursor:
    consumed = set(cursor.consumed) | newly_consumed
    offsets, still_referenced = dict(cursor.offsets), set()
    for path in store.segment_paths():
        moving = True
        for stored in read_segment(path, cursor.offsets.get(path.name, 0)):
            if moving and stored.episode_key in consumed:
                offsets[path.name] = stored.end
            else:
                moving = False
                if stored.episode_key in consumed:
                    still_referenced.add(stored.episode_key)
    return Cursor(offsets=offsets, consumed=sorted(still_referenced), history=cursor.history)


class FeedbackWeights(StrictModel):
    """Per-step loss weights. Uncorrected steps of failed episodes get 0 by default: imitating what
    led to a failure teaches the failure; those frames still serve as history for the steps after.
    """

    corrected: float = Field(4.0, ge=0)  # operator gave action_corrected, or took over (intervention)
    success: float = Field(1.0, ge=0)  # uncorrected steps of successful episodes
    unknown_outcome: float = Field(0.5, ge=0)  # uncorrected steps, success not reported
    failure: float = Field(0.0, ge=0)  # uncorrected steps of failed episodes


@dataclass
class FeedbackSummary:
    episodes: int = 0
    steps: int = 0
    corrected_steps: int = 0
    intervention_steps: int = 0
    dropped_steps: int = 0  # undecodable images (should have been refused at the API)
    skipped_episodes: list[str] = field(default_factory=list)


@dataclass
class AssembleResult:
    out_dir: Path
    episodes: list[str]  # file names written
    waiting: list[str]  # episode keys not finished yet
    cursor: Cursor
    summary: FeedbackSummary


def _decode_image(data: bytes, size: tuple[int, int] | None):
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)  # [H, W, 3]


def _model_version(stored: StoredRecord) -> str | None:
    """The version that drove the step: serving's `model: {name, version}`, or a flat `model_version`."""
    model = stored.meta.get("model")
    version = model.get("version") if isinstance(model, dict) else stored.meta.get("model_version")
    return str(version) if version is not None else None


def write_feedback_episode(
    out_dir: Path,
    key: str,
    steps: dict[int, StoredRecord],
    weights: FeedbackWeights,
    control_hz: float,
    summary: FeedbackSummary,
) -> str | None:
    import h5py
    import numpy as np

    from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode

    ordered = [steps[i] for i in sorted(steps)]
    success = next((s.meta["success"] for s in reversed(ordered) if s.meta.get("success") is not None), None)
    frames, kept = [], []
    size = None
    for stored in ordered:
        try:
            frame = _decode_image(stored.image, size)
        except Exception as exc:  # PIL raises many kinds for bad bytes
            log.warning("feedback %s step %s: undecodable image (%s); step dropped", key, stored.meta["step"], exc)
            summary.dropped_steps += 1
            continue
        size = size or frame.shape[:2]
        frames.append(frame)
        kept.append(stored)
    state_dims = {len(s.meta["state"]) for s in kept}
    if not kept or len(state_dims) > 1:
        why = "no decodable frames" if not kept else f"state lengths differ between steps: {sorted(state_dims)}"
        log.warning("feedback %s: skipped (%s)", key, why)
        summary.skipped_episodes.append(f"{key}: {why}")
        return None

    executed = np.array([s.meta["action_executed"] for s in kept], dtype=np.float32)  # [T, 3]
    corrected = np.array([s.meta.get("action_corrected") is not None for s in kept])  # [T]
    intervention = np.array([bool(s.meta.get("intervention")) for s in kept])  # [T]
    labels = np.array(
        [
            s.meta["action_corrected"] if s.meta.get("action_corrected") is not None else s.meta["action_executed"]
            for s in kept
        ],
        dtype=np.float32,
    )  # [T, 3]
    base = {True: weights.success, False: weights.failure, None: weights.unknown_outcome}[success]
    step_weight = np.where(corrected | intervention, weights.corrected, base).astype(np.float32)  # [T]
    state = np.array([s.meta["state"] for s in kept], dtype=np.float32) if state_dims != {0} else None
    robot_id, episode_id = key.split("/", 1)
    step_ids = [int(s.meta["step"]) for s in kept]
    attrs = {
        "instruction": kept[0].meta["instruction"],
        "episode_id": f"feedback-{robot_id}-{episode_id}",
        "source": "feedback",
        "success": bool(success),
        "success_reported": success is not None,
        "control_hz": float(control_hz),
        "schema_version": SCHEMA_VERSION,
        "robot_id": robot_id,
        "feedback_episode_id": episode_id,
        "finished": any(s.meta.get("episode_done") for s in kept),
        "missing_steps": int(step_ids[-1] - step_ids[0] + 1 - len(step_ids)),
        "corrected_steps": int(corrected.sum()),
        "intervention_steps": int(intervention.sum()),
        "model_versions": json.dumps(sorted({v for v in map(_model_version, kept) if v})),
    }
    name = f"fb_{robot_id}_{episode_id}.h5"
    tmp = out_dir / f".{name}.assembling.h5"
    # write_episode validates and writes the standard keys; the feedback arrays are added before the
    # file gets its real name, so a crash never leaves an episode without its weights.
    write_episode(tmp, Episode(np.stack(frames), labels, state, attrs))
    with h5py.File(tmp, "a") as f:
        f.create_dataset("weight", data=step_weight)
        f.create_dataset("intervention", data=intervention.astype(np.uint8))
        f.create_dataset("corrected", data=corrected.astype(np.uint8))
        f.create_dataset("action_executed", data=executed)
        f.create_dataset("step", data=np.array(step_ids, dtype=np.int64))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out_dir / name)
    summary.episodes += 1
    summary.steps += len(kept)
    summary.corrected_steps += int(corrected.sum())
    summary.intervention_steps += int(intervention.sum())
    return name


def read_step_weights(path: str | Path) -> Any | None:
    """float32 [T] per-step loss weights of an assembled feedback episode (None for other episodes)."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["weight"][()] if "weight" in f else None


# ---------------------------------------------------------------------------------------- inspection
def describe_feedback(root: str | Path) -> dict:
    """What `mobile-vla data inspect` shows for a feedback root: volume, robots, episodes, corrections,
    torn tails, and how much is new since the last online update.
    """
    store = FeedbackStore(root, repair=False)
    if not store.segments_dir.is_dir():
        raise DataError(f"{root}: no feedback segments/ folder (is this a feedback root?)")
    scans = store.scan()
    cursor = store.load_cursor()
    episodes = store.pending_episodes(Cursor())
    new_keys = set(store.pending_episodes(cursor))
    finished = {k: v for k, v in episodes.items() if any(s.meta.get("episode_done") for s in v.values())}
    outcomes = [
        next((s.meta["success"] for s in v.values() if s.meta.get("success") is not None), None)
        for v in finished.values()
    ]
    steps = [s for v in episodes.values() for s in v.values()]
    return {
        "root": str(Path(root).resolve()),
        "segments": len(scans),
        "bytes": sum(s.size for s in scans),
        "records": sum(s.records for s in scans),
        "unique_steps": len(steps),
        "torn_or_corrupt": [
            {"segment": s.name, "at_byte": s.valid_end, "problem": s.problem} for s in scans if s.problem
        ],
        "robots": len({k.split("/", 1)[0] for k in episodes}),
        "episodes": len(episodes),
        "finished_episodes": len(finished),
        "success_rate": (sum(bool(o) for o in outcomes if o is not None) / max(1, sum(o is not None for o in outcomes)))
        if any(o is not None for o in outcomes)
        else None,
        "corrected_steps": sum(s.meta.get("action_corrected") is not None for s in steps),
        "intervention_steps": sum(bool(s.meta.get("intervention")) for s in steps),
        "new_episodes_since_last_update": len(new_keys),
        "updates": len(cursor.history),
        "last_record_time": max((float(s.meta.get("received_at", 0)) for s in steps), default=None),
    }


def describe_feedback_dataset(folder: str | Path, manifest: dict) -> dict:
    """For an assembled feedback dataset (manifest generator kind 'feedback'): robots, corrections,
    interventions and the loss weight they carry, read without loading frames.
    """
    import h5py

    totals = {
        "episodes": 0,
        "steps": 0,
        "corrected_steps": 0,
        "intervention_steps": 0,
        "weight_sum": 0.0,
        "zero_weight_steps": 0,
        "successes": 0,
    }
    robots = set()
    for name in manifest.get("episodes", {}):
        with h5py.File(Path(folder) / name, "r") as f:
            weight = f["weight"][()] if "weight" in f else None
            totals["episodes"] += 1
            totals["steps"] += int(f["actions"].shape[0])
            totals["corrected_steps"] += int(f["corrected"][()].sum()) if "corrected" in f else 0
            totals["intervention_steps"] += int(f["intervention"][()].sum()) if "intervention" in f else 0
            totals["weight_sum"] += float(weight.sum()) if weight is not None else 0.0
            totals["zero_weight_steps"] += int((weight == 0).sum()) if weight is not None else 0
            totals["successes"] += int(bool(f.attrs.get("success", False)))
            robots.add(str(f.attrs.get("robot_id", "?")))
    totals["robots"] = len(robots)
    return totals
