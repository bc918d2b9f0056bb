"""The feedback write-ahead log: framed records in per-writer segment files, group-committed fsyncs,
resync past corrupt frames, torn-tail repair, and retirement of consumed segments.

    writer = SegmentWriter(root, root / "segments", segment_max_bytes)
    writer.append(encode_frame(meta, image))            # durable when it returns
    for stored in read_segment(path): ...               # valid records; skips a corrupt frame mid-segment
    repair_segments(segments_dir, root / "quarantine")  # cut dead writers' torn tails (tail only: bounded)

A record on disk is `MAGIC | payload length (u32) | crc32(payload) (u32) | payload`, with payload =
`meta length (u32) | meta JSON | image bytes`. Concurrent appends in one process share fsyncs (group
commit), so throughput does not collapse to one fsync per request. A kill -9 or a power loss can leave
at most one torn frame at the end of that writer's segment: readers detect it by length and checksum.
A frame damaged in the middle (a flipped bit) costs that frame only: readers search forward for the
next frame whose magic, length and checksum hold, and go on from there. `repair_segments` cuts torn
tails off (copying them to quarantine/ first, fsynced, then truncating) once the dead writer's file
lock is gone; it reads only each segment's last frame, so a restart does not re-read the log.

Durability order: a new folder's name is fsynced in its parent, a new segment's name in segments/,
every record before its append returns, a quarantine copy before the truncate it protects. A full
disk raises `StorageFullError` (an OSError with errno ENOSPC) and leaves no partial frame and no empty
segment behind; the same segment takes the next append once space returns.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"MVF1"
HEADER = struct.Struct(">4sII")  # magic, payload length, crc32(payload)
META_LEN = struct.Struct(">I")
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a frame claiming more is corruption, not a record
SEGMENT_SUFFIX = ".wal"
SEGMENTS_DIR = "segments"  # under the feedback root: every writer's segment files
QUARANTINE_DIR = "quarantine"  # under the feedback root: torn tails cut off dead writers' segments
RESYNC_CHUNK = 1024 * 1024  # bytes searched at a time for the next frame after a corrupt one
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageFullError(OSError):
    """The feedback log's disk (or quota) is full: nothing was stored; retry once space is freed."""


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
    """What reading one segment found: its size, how far the frames are whole, what was skipped."""

    name: str
    size: int
    valid_end: int  # end of the last whole, checksummed frame: what follows it is a torn or corrupt tail
    records: int
    problem: str | None = None  # why the tail after valid_end is not a record (None: no tail)
    skipped: list[tuple[int, int, str]] = field(default_factory=list)  # corrupt ranges mid-segment


def _parse_frame(head: bytes, payload_reader, offset: int, size: int) -> tuple[str | None, dict, bytes, int]:
    """(problem or None, meta, image, frame end) of the frame at `offset`, whose header is `head`.

    `payload_reader(n)` returns the n payload bytes after the header; frames must end by `size`.
    """
    if len(head) < HEADER.size:
        return f"torn header at byte {offset} ({len(head)} of {HEADER.size} bytes)", {}, b"", offset
    magic, length, crc = HEADER.unpack(head)
    if magic != MAGIC or length > MAX_RECORD_BYTES or length < META_LEN.size:
        return f"bad frame header at byte {offset} (magic {magic!r}, length {length})", {}, b"", offset
    end = offset + HEADER.size + length
    if end > size:
        return (
            f"torn record at byte {offset} ({size - offset - HEADER.size} of {length} payload bytes)",
            {},
            b"",
            offset,
        )
    payload = payload_reader(length)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return f"checksum mismatch at byte {offset}", {}, b"", offset
    (meta_len,) = META_LEN.unpack_from(payload)
    try:
        meta = json.loads(payload[META_LEN.size : META_LEN.size + meta_len])
        if not isinstance(meta, dict):
            raise ValueError("meta is not an object")
    except (UnicodeDecodeError, ValueError):  # crc matched, so the writer wrote this: a bug
        return f"unreadable meta at byte {offset}", {}, b"", offset
    return None, meta, payload[META_LEN.size + meta_len :], end


def _frame_at(fd: int, offset: int, size: int) -> tuple[str | None, dict, bytes, int]:
    """(problem or None, meta, image, end) of the frame starting at `offset` (positioned reads)."""
    head = os.pread(fd, HEADER.size, offset) if offset + HEADER.size <= size else os.pread(fd, size - offset, offset)
    return _parse_frame(head, lambda n: os.pread(fd, n, offset + HEADER.size), offset, size)


def _next_frame(fd: int, start: int, size: int) -> int | None:
    """Where the next whole, checksummed frame at or after `start` begins (None: there is none)."""
    position = start
    while position < size:
        chunk = os.pread(fd, min(RESYNC_CHUNK + len(MAGIC) - 1, size - position), position)
        found = chunk.find(MAGIC)
        while found != -1:
            if _frame_at(fd, position + found, size)[0] is None:
                return position + found
            found = chunk.find(MAGIC, found + 1)
        position += RESYNC_CHUNK
    return None


def read_segment(path: Path, start: int = 0, scan: SegmentScan | None = None) -> Iterator[StoredRecord]:
    """Valid records of one segment from `start`, as far as the file reached when reading began.

    A corrupt frame in the middle is skipped (reading resumes at the next valid frame; `scan.skipped`
    lists the range); a torn or corrupt tail ends reading (`scan.problem`). A frame still being
    written by a live writer looks like a torn tail: not yet a record.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = start
        while offset < size:
            problem, meta, image, end = _frame_at(fd, offset, size)
            if problem is None:
                if scan is not None:
                    scan.valid_end, scan.records = end, scan.records + 1
                yield StoredRecord(meta, image, path.name, offset, end)
                offset = end
                continue
            resume = _next_frame(fd, offset + 1, size)
            if resume is None:  # nothing whole after it: the tail
                if scan is not None:
                    scan.problem = problem
                return
            if scan is not None:
                scan.skipped.append((offset, resume, problem))
            offset = resume
    finally:
        os.close(fd)


def last_frame_end(fd: int, size: int) -> int:
    """End of the segment's last whole frame, found by searching back from the end in growing windows:
    reads about one frame when the file ends cleanly, never the whole log. 0 when no frame is whole.
    """
    window_end, window = size, 64 * 1024
    while window_end > 0:
        window_start = max(0, window_end - window)
        chunk = os.pread(fd, min(window_end + len(MAGIC) - 1, size) - window_start, window_start)
        found = chunk.rfind(MAGIC)
        while found != -1:
            problem, _, _, end = _frame_at(fd, window_start + found, size)
            if problem is None:
                return end
            found = chunk.rfind(MAGIC, 0, found)
        window_end, window = window_start, min(window * 2, RESYNC_CHUNK)
    return 0


def fsync_dir(path: Path) -> None:
    """Syncs a directory to disk, so the names created or replaced in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p` whose new folders survive a crash: each one's name is fsynced in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_dir(folder.parent)


def write_durably(path: Path, data: bytes) -> None:
    """Writes a new file and fsyncs it and its name (the copy exists on disk when this returns); a write
    that fails (a full disk) leaves no partial file behind.
    """
    make_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError:
        _remove_partial(path)
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _remove_partial(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("feedback %s: could not remove a partial copy: %s", path.name, exc)


def storage_error(exc: OSError, where: Path) -> OSError:
    """`StorageFullError` for a full disk or quota (ENOSPC, EDQUOT), else the error itself."""
    if exc.errno in FULL_ERRNOS:
        return StorageFullError(
            exc.errno, f"feedback log {where}: no space left ({os.strerror(exc.errno)}); nothing stored, retry later"
        )
    return exc


# ------------------------------------------------------------------------------------ segment files
def segment_paths(segments_dir: Path) -> list[Path]:
    """Every segment file under `segments_dir`, in name order (none when the folder does not exist)."""
    if not segments_dir.is_dir():
        return []
    return sorted(p for p in segments_dir.iterdir() if p.suffix == SEGMENT_SUFFIX)


def scan_segment(path: Path) -> SegmentScan:
    """Reads one segment through: its size, valid bytes, records, skipped ranges and its torn tail."""
    scan = SegmentScan(path.name, path.stat().st_size, 0, 0)
    for _ in read_segment(path, 0, scan):
        pass
    return scan


def _lock_dead_writers_segment(path: Path) -> int | None:
    """An O_RDWR fd of `path` holding its flock, or None when a live writer holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def repair_segments(segments_dir: Path, quarantine_dir: Path) -> list[SegmentScan]:
    """Cuts torn tails off segments whose writer is gone (its flock released): the cut bytes are
    written to `quarantine_dir` and fsynced before the segment is truncated. Reads only each
    segment's last frame (`last_frame_end`). Segments of live writers are left alone. A tail whose
    copy cannot be written (a full disk) stays in its segment, with no partial copy left, for a
    later start to cut: opening a store never fails on it. Returns what was cut.
    """
    repaired = []
    for path in segment_paths(segments_dir):
        fd = _lock_dead_writers_segment(path)
        if fd is None:
            continue
        try:
            size = os.fstat(fd).st_size
            valid_end = last_frame_end(fd, size)
            if valid_end < size:
                problem = _frame_at(fd, valid_end, size)[0]
                tail = os.pread(fd, size - valid_end, valid_end)
                copy = quarantine_dir / f"{path.name}.{valid_end}.torn"
                try:
                    write_durably(copy, tail)  # before the truncate
                except OSError as exc:  # a full disk: the store must still open (an update frees space)
                    log.warning("feedback %s: %s; tail left for a later start: %s", path.name, problem, exc)
                    continue  # readers stop at a torn tail anyway
                os.ftruncate(fd, valid_end)
                os.fsync(fd)
                log.warning("feedback %s: %s; cut %d bytes to quarantine/", path.name, problem, len(tail))
                repaired.append(SegmentScan(path.name, size, valid_end, 0, problem))
        finally:
            os.close(fd)
    return repaired


def retire_segments(segments_dir: Path, offsets: dict[str, int], keep_s: float, now: float | None = None) -> list[str]:
    """Deletes segments that every committed cursor offset has passed: no whole record after
    `offsets[name]`, no live writer (flock), and last written more than `keep_s` seconds ago.

    Returns:
        The names deleted (their directory is fsynced once).
    """
    now = time.time() if now is None else now
    retired = []
    for path in segment_paths(segments_dir):
        if path.name not in offsets:
            continue
        fd = _lock_dead_writers_segment(path)
        if fd is None:
            continue
        try:
            if os.fstat(fd).st_mtime > now - keep_s:
                continue
            if next(read_segment(path, offsets[path.name]), None) is not None:
                continue  # records of episodes no update has used yet
            path.unlink()
            retired.append(path.name)
        finally:
            os.close(fd)
    if retired:
        fsync_dir(segments_dir)
        log.info("feedback: retired %d consumed segments", len(retired))
    return retired


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
    `repair_segments` and `retire_segments` keep off it). A segment rotates once it would pass
    `segment_max_bytes`.
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
            StorageFullError: the disk or quota is full (nothing stored, nothing left behind).
            OSError: the disk refused otherwise (nothing is acknowledged).
        """
        with self._write_lock:
            try:
                segment = self._active_segment(len(frame))
            except OSError as exc:
                raise storage_error(exc, self.segments_dir) from exc
            start = segment.written
            try:
                _write_all(segment.fd, frame)
            except OSError as exc:
                self._cut_back(segment, start)
                raise storage_error(exc, self.segments_dir) from exc
            segment.written += len(frame)
            end = segment.written
        try:
            self._sync(segment, end)
        except OSError as exc:
            raise storage_error(exc, self.segments_dir) from exc

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
        make_dirs(self.segments_dir)
        self._seq += 1
        path = self.segments_dir / f"{self.writer_id}-{self._seq:05d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "a live writer owns this": repair keeps off
            fsync_dir(self.segments_dir)  # the new name itself must survive a crash
        except OSError:
            os.close(fd)
            self._unlink(path)
            raise
        return _Segment(path, fd)

    def _sync(self, segment: _Segment, end: int) -> None:
        with self._sync_lock:
            if segment.synced >= end:
                return  # another thread's fsync covered this record
            if segment.broken:
                raise OSError(errno.EIO, f"{segment.path}: segment abandoned before this record was synced")
            target = segment.written
            try:
                os.fsync(segment.fd)
            except OSError:
                segment.broken = True  # after a failed fsync the page cache cannot be trusted
                self._forget(segment)
                if segment.synced == 0:  # nothing in it was acknowledged: leave no litter
                    self._unlink(segment.path)
                raise
            segment.synced = target

    def _cut_back(self, segment: _Segment, truncate_to: int) -> None:
        """A failed write: cut back to the last whole frame so the file stays valid. The segment stays
        open for the next append (a full disk does not make a new file per retry); an empty one is
        removed; one that cannot be cut back is abandoned.
        """
        with self._sync_lock:
            try:
                os.ftruncate(segment.fd, truncate_to)
                os.fsync(segment.fd)
                segment.synced = segment.written = truncate_to
            except OSError:
                segment.broken = True
            if segment.broken or truncate_to == 0:
                self._forget(segment)
                if truncate_to == 0:
                    self._unlink(segment.path)

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink()
            fsync_dir(path.parent)
        except OSError as exc:
            log.warning("feedback %s: could not remove an empty segment: %s", path.name, exc)

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
