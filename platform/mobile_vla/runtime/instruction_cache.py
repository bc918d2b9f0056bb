"""The one per-instruction cache: robots repeat one instruction every step, so encode it once.

    cache = InstructionCache(size=1024)
    rows = cache.lookup(["go to the red box"] * B, encode)   # encode(new texts) -> one row per text

A row is whatever `encode` makes of one instruction: the backends keep Kosmos tokens + the CLIP text
feature, so the text encoder runs once per instruction instead of once per step. Thread-safe (a
serving replica predicts from several threads); `encode` runs outside the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Row = TypeVar("Row")


class InstructionCache(Generic[Row]):
    """A thread-safe LRU of instruction -> encoded row, with hit and miss counts.

    Args:
        size: how many distinct instructions to keep; the least recently used go first.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: OrderedDict[str, Row] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, instructions: Sequence[str], encode: Callable[[list[str]], Sequence[Row]]) -> list[Row]:
        """One row per instruction, in order; `encode` gets each missing instruction once."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in instructions if t not in self._rows))
            self.hits += len(instructions) - len(missing)
            self.misses += len(missing)
        if missing:
            encoded = encode(missing)  # outside the lock: may take a few ms
            with self._lock:
                self._rows.update(zip(missing, encoded, strict=True))
        rows = []
        with self._lock:
            for text in instructions:
                row = self._rows[text] if text in self._rows else encode([text])[0]  # evicted meanwhile
                self._rows[text] = row
                self._rows.move_to_end(text)
                rows.append(row)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)
        return rows
