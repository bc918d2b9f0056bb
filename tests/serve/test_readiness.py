import asyncio

from mobile_vla.serve.readiness import CachedStatus


def test_probes_share_one_fetch_per_ttl():
    now = [0.0]
    fetches = []

    async def fetch():
        fetches.append(now[0])
        await asyncio.sleep(0)  # concurrent callers arrive while it is in flight
        return [f"status {len(fetches)}"]

    async def probes():
        cached = CachedStatus(fetch, ttl_s=1.0, clock=lambda: now[0])
        first = await asyncio.gather(*(cached.get() for _ in range(50)))
        now[0] = 0.9
        again = [await cached.get() for _ in range(50)]
        now[0] = 1.0
        later = await cached.get()
        return first, again, later

    first, again, later = asyncio.run(probes())
    assert len(fetches) == 2  # 101 probes: one fetch per second, not two RPCs per probe
    assert all(answer == ["status 1"] for answer in first + again) and later == ["status 2"]
