"""A small file every replica follows: re-read when it changes, checked at most every `interval_s`.

Used for the API tokens file and the memory-token keys, so a revoked token or a rotated key reaches
every ingress replica (old ones and ones started later read the same file) without a redeploy.
A check is one `stat()`; the file is read and hashed only when its identity or times moved (inode,
device, size, mtime, ctime: an editor's save, an atomic rename and an rsync that keeps the mtime each
change one) or while its mtime is too close to the last read to trust (an edit in the same clock
tick). A changed file that no longer parses, or a file that went missing, keeps the last good
version and is logged: a half-written edit never locks the fleet out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from mobile_vla.errors import ConfigError

logger = logging.getLogger("ray.serve")

DEFAULT_RELOAD_INTERVAL_S = 2.0
RACY_MTIME_S = 2.0  # coarsest mtime granularity we allow for (FAT: 2 s); newer files are re-read

T = TypeVar("T")


def _stat_key(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    return (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class WatchedFile(Generic[T]):
    """The parsed content of `path`, refreshed by `current()` when the file changed.

    Args:
        path: the file; it must exist and parse now (ConfigError otherwise).
        parse: file bytes -> value; raises ConfigError for content it refuses.
        interval_s: at most one stat per this many seconds (0: on every call).
        clock: monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        path: Path,
        parse: Callable[[bytes], T],
        interval_s: float = DEFAULT_RELOAD_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path, self._parse, self._interval_s, self._clock = Path(path), parse, interval_s, clock
        try:
            stat = os.stat(self.path)
            content = self.path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: file not found") from None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read it ({exc.strerror})") from None
        self.value: T = parse(content)
        self._digest = hashlib.sha256(content).digest()
        self._stat = _stat_key(stat)
        self._read_at = time.time()
        self._checked_at = clock()
        self._problem: str | None = None

    def __repr__(self) -> str:
        return f"WatchedFile({self.path})"

    def current(self) -> T:
        """The value, re-read first when the last check is `interval_s` old and the file changed."""
        now = self._clock()
        if now - self._checked_at >= self._interval_s:
            self._checked_at = now
            self._refresh()
        return self.value

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
            key = _stat_key(stat)
            racy = stat.st_mtime >= self._read_at - RACY_MTIME_S
            if key == self._stat and not racy:
                return
            content = self.path.read_bytes()
        except OSError as exc:
            self._report(f"{self.path}: cannot read it ({exc.strerror}); keeping the version read before")
            return
        self._stat, self._read_at = key, time.time()
        digest = hashlib.sha256(content).digest()
        if digest == self._digest:
            return
        try:
            value = self._parse(content)
        except ConfigError as exc:
            self._report(f"{exc}; keeping the version read before")
            return
        self.value, self._digest, self._problem = value, digest, None
        logger.info("%s: changed, reloaded", self.path)

    def _report(self, problem: str) -> None:
        if problem != self._problem:  # once per distinct problem, not every interval
            logger.error(problem)
            self._problem = problem


def write_file_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` (mode 0600) through a rename, so a follower never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
