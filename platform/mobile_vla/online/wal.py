"""The feedback write-ahead log: framed records in per-writer segment files, group-committed fsyncs,
torn-tail detection and repair.

    writer = SegmentWriter(root, root / "segments")
    writer.append(encode_frame(meta, image))            # durable when it returns
    for stored in read_segment(path): ...               # valid records; stops at a torn or corrupt frame
    repair_segments(segments_dir, root / "quarantine")  # cut dead writers' torn tails

A record on disk is `MAGIC | payload length (u32) | crc32(payload) (u32) | payload`, with payload =
`meta length (u32) | meta JSON | image bytes`. Concurrent appends in one process share fsyncs (group
commit), so throughput does not collapse to one fsync per request. A kill -9 can leave at most one torn
frame at the end of that writer's segment: readers detect it by length and checksum and stop there;
`repair_segments` cuts it off (to quarantine/) once the dead writer's file lock is gone. Every
acknowledged record precedes the tear.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"MVF1"
HEADER = struct.Struct(">4sII")  # magic, payload length, crc32(payload)
META_LEN = struct.Struct(">I")
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a frame claiming more is corruption, not a record
SEGMENT_SUFFIX = ".wal"
SEGMENTS_DIR = "segments"  # under the feedback root: every writer's segment files
QUARANTINE_DIR = "quarantine"  # under the feedback root: torn tails cut off dead writers' segments


# ---------------------------------------------------------------------------------------------- frames
def encode_frame(meta: dict, image: bytes) -> bytes:
    """One record as it goes on disk: header (magic, length, crc32) then meta JSON and image bytes."""
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload = META_LEN.pack(len(meta_bytes)) + meta_bytes + image
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass
class StoredRecord:
    """One valid record read back: its meta, image bytes, and where its frame sits in its segment."""

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
    """What reading one segment found: its size, how far the frames are whole, and why it stopped early."""

    name: str
    size: int
    valid_end: int  # bytes up to here are whole, checksummed frames
    records: int
    problem: str | None = None  # why reading stopped before the end (torn tail or corruption)


def _frame_problem(handle, header: bytes, offset: int) -> tuple[str | None, bytes]:
    """(why this frame is not a record or None, its payload) for the frame whose header was just read."""
    if len(header) < HEADER.size:
        return f"torn header at byte {offset} ({len(header)} of {HEADER.size} bytes)", b""
    magic, length, crc = HEADER.unpack(header)
    if magic != MAGIC or length > MAX_RECORD_BYTES or length < META_LEN.size:
        return f"bad frame header at byte {offset} (magic {magic!r}, length {length})", b""
    payload = handle.read(length)
    if len(payload) < length:
        return f"torn record at byte {offset} ({len(payload)} of {length} payload bytes)", b""
    if zlib.crc32(payload) != crc:
        return f"checksum mismatch at byte {offset}", b""
    return None, payload


def read_segment(path: Path, start: int = 0, scan: SegmentScan | None = None) -> Iterator[StoredRecord]:
    """Valid records of one segment from `start`; stops cleanly at the first torn or corrupt frame
    (filling `scan.problem`). A frame still being written by a live writer looks the same: not yet a record.
    """
    with open(path, "rb") as handle:
        handle.seek(start)
        offset = start
        while header := handle.read(HEADER.size):
            problem, payload = _frame_problem(handle, header, offset)
            if problem is None:
                (meta_len,) = META_LEN.unpack_from(payload)
                try:
                    meta = json.loads(payload[META_LEN.size : META_LEN.size + meta_len])
                except (UnicodeDecodeError, json.JSONDecodeError):  # crc matched, so the writer wrote this: a bug
                    problem = f"unreadable meta at byte {offset}"
            if problem:
                if scan is not None:
                    scan.problem = problem
                break
            end = offset + len(header) + len(payload)
            if scan is not None:
                scan.valid_end, scan.records = end, scan.records + 1
            yield StoredRecord(meta, payload[META_LEN.size + meta_len :], path.name, offset, end)
            offset = end


def fsync_dir(path: Path) -> None:
    """Syncs a directory to disk, so the names created or replaced in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ segment files
def segment_paths(segments_dir: Path) -> list[Path]:
    """Every segment file under `segments_dir`, in name order (none when the folder does not exist)."""
    if not segments_dir.is_dir():
        return []
    return sorted(p for p in segments_dir.iterdir() if p.suffix == SEGMENT_SUFFIX)


def scan_segment(path: Path) -> SegmentScan:
    """Reads one segment through: its size, valid bytes, records, and why reading stopped early."""
    scan = SegmentScan(path.name, path.stat().st_size, 0, 0)
    for _ in read_segment(path, 0, scan):
        pass
    return scan


def repair_segments(segments_dir: Path, quarantine_dir: Path) -> list[SegmentScan]:
    """Cuts torn tails off segments whose writer is gone (its flock released), moving the cut bytes to
    `quarantine_dir`. Segments of live writers are left alone. Returns what was cut.
    """
    repaired = []
    for path in segment_paths(segments_dir):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            scan = scan_segment(path)
            if scan.valid_end < scan.size:
                quarantine_dir.mkdir(exist_ok=True)
                os.lseek(fd, scan.valid_end, os.SEEK_SET)
                tail = os.read(fd, scan.size - scan.valid_end)
                (quarantine_dir / f"{path.name}.{scan.valid_end}.torn").write_bytes(tail)
                os.ftruncate(fd, scan.valid_end)
                os.fsync(fd)
                log.warning("feedback %s: %s; cut %d bytes to quarantine/", path.name, scan.problem, len(tail))
                repaired.append(scan)
        finally:
            os.close(fd)
    return repaired


# ---------------------------------------------------------------------------------------------- writer
@dataclass
class _Segment:
    path: Path
    fd: int
    written: int = 0  # bytes whose write() completed
    synced: int = 0  # bytes known to be on disk
    broken: bool = False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"write returned {written}")
        view = view[written:]


class SegmentWriter:
    """This process's append-only segments: `<host>-<pid>-<tag>-<seq>.wal`, never shared with another writer.

    Thread-safe within a process; one per process (a segment is flock'ed by its writer while open, so
    `repair_segments` keeps off it). A segment rotates once it would pass `segment_max_bytes`.
    """

    def __init__(self, root: Path, segments_dir: Path, segment_max_bytes: int):
        self.root = root
        self.segments_dir = segments_dir
        self.segment_max_bytes = segment_max_bytes
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._seq = 0
        self._segment: _Segment | None = None
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._pid = os.getpid()

    def append(self, frame: bytes) -> None:
        """Writes one whole frame; returns only when it is fsynced.

        Raises:
            OSError: the disk refused (nothing is acknowledged; a retry goes to a fresh segment).
        """
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

    def close(self) -> None:
        """Syncs to disk and closes the open segment (a later append opens a new one)."""
        with self._write_lock:
            if self._segment is not None:
                self._close_segment(self._segment)

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
            fsync_dir(self.root)
        self._seq += 1
        path = self.segments_dir / f"{self.writer_id}-{self._seq:05d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "a live writer owns this": repair keeps off
        fsync_dir(self.segments_dir)  # the new name itself must survive a crash
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
