"""The one per-instruction cache: each instruction encoded once, LRU eviction, rows in request order."""

from __future__ import annotations

import threading

from mobile_vla.runtime.instruction_cache import InstructionCache


def test_each_new_instruction_is_encoded_once_in_a_batch():
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(list(texts))
        return [f"row:{t}" for t in texts]

    cache: InstructionCache[str] = InstructionCache(size=8)
    rows = cache.lookup(["a", "b", "a", "c"], encode)
    assert rows == ["row:a", "row:b", "row:a", "row:c"]
    assert calls == [["a", "b", "c"]]  # one call, each distinct text once
    assert cache.lookup(["c", "a"], encode) == ["row:c", "row:a"]
    assert calls == [["a", "b", "c"]]
    assert (cache.hits, cache.misses, len(cache)) == (3, 3, 3)


def test_least_recently_used_instructions_are_evicted():
    cache: InstructionCache[str] = InstructionCache(size=2)
    encode = lambda texts: [t.upper() for t in texts]
    cache.lookup(["a", "b"], encode)
    cache.lookup(["a"], encode)  # b is now the least recently used
    cache.lookup(["c"], encode)
    assert len(cache) == 2
    misses = cache.misses
    cache.lookup(["a", "c"], encode)
    assert cache.misses == misses  # both kept
    cache.lookup(["b"], encode)
    assert cache.misses == misses + 1  # b had been evicted


def test_concurrent_lookups_agree():
    cache: InstructionCache[str] = InstructionCache(size=4)
    texts = [f"go to box {i % 6}" for i in range(60)]
    results: list[list[str]] = []

    def worker():
        results.append(cache.lookup(texts, lambda batch: [t[::-1] for t in batch]))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(rows == [t[::-1] for t in texts] for rows in results)
    assert len(cache) <= 4
