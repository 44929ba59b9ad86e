"""The --max-parallel slots: a hard cap, shared fairly between clusters."""

import asyncio

import pytest

from async_embed_sync.transfer.sync import FairSlots


class Recorder:
    def __init__(self, slots):
        self.slots = slots
        self.in_flight = {}
        self.peak_total = 0
        self.peak = {}
        self.release = asyncio.Event()

    async def job(self, owner):
        async with self.slots.slot(owner):
            self.in_flight[owner] = self.in_flight.get(owner, 0) + 1
            self.peak[owner] = max(self.peak.get(owner, 0), self.in_flight[owner])
            self.peak_total = max(self.peak_total, sum(self.in_flight.values()))
            await self.release.wait()
            await asyncio.sleep(0)
            self.in_flight[owner] -= 1


def test_a_listing_cluster_keeps_its_share():
    async def scenario():
        slots = FairSlots(4)
        recorder = Recorder(slots)
        slots.register("busy")
        slots.register("late")  # still listing
        slots.set_need("busy", 32)
        tasks = [asyncio.create_task(recorder.job("busy")) for _ in range(32)]
        await asyncio.sleep(0.01)
        busy_before_late_listed = recorder.in_flight["busy"]
        slots.set_need("late", 3)
        tasks += [asyncio.create_task(recorder.job("late")) for _ in range(3)]
        await asyncio.sleep(0.01)
        late_at_start = recorder.in_flight.get("late", 0)
        recorder.release.set()
        await asyncio.gather(*tasks)
        return busy_before_late_listed, late_at_start, recorder

    busy_first, late_first, recorder = asyncio.run(scenario())
    # The first cluster to list did not take every slot: half stayed for the other.
    assert busy_first == 2
    assert late_first == 2
    assert recorder.peak_total == 4
    assert recorder.peak["busy"] == 4  # once "late" ran out of files, "busy" got them all


def test_a_cluster_that_needs_little_leaves_the_rest():
    async def scenario():
        slots = FairSlots(8)
        recorder = Recorder(slots)
        for owner, files in (("small", 1), ("large", 20)):
            slots.register(owner)
            slots.set_need(owner, files)
        tasks = [asyncio.create_task(recorder.job("small"))]
        tasks += [asyncio.create_task(recorder.job("large")) for _ in range(20)]
        await asyncio.sleep(0.01)
        snapshot = dict(recorder.in_flight)
        recorder.release.set()
        await asyncio.gather(*tasks)
        return snapshot

    assert asyncio.run(scenario()) == {"small": 1, "large": 7}


def test_a_failed_cluster_gives_its_share_back():
    async def scenario():
        slots = FairSlots(4)
        recorder = Recorder(slots)
        slots.register("ok")
        slots.register("broken")
        slots.set_need("ok", 8)
        tasks = [asyncio.create_task(recorder.job("ok")) for _ in range(8)]
        await asyncio.sleep(0.01)
        before = recorder.in_flight["ok"]
        slots.unregister("broken")  # its listing failed
        await asyncio.sleep(0.01)
        after = recorder.in_flight["ok"]
        recorder.release.set()
        await asyncio.gather(*tasks)
        return before, after

    assert asyncio.run(scenario()) == (2, 4)


def test_cancelled_waiter_does_not_leak_a_slot():
    async def scenario():
        slots = FairSlots(1)
        slots.register("a")
        slots.set_need("a", 3)
        gate = asyncio.Event()

        async def holder():
            async with slots.slot("a"):
                await gate.wait()

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter.cancel()
        gate.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # The slot is free again: a new holder gets it at once.
        await asyncio.wait_for(holder(), 1)

    asyncio.run(scenario())



def test_the_byte_budget_admits_small_files_and_holds_back_a_large_one():
    """Files in flight are capped by count and by the bytes they may hold: a
    large file waits while small ones fill the budget, and one larger than
    the whole budget goes alone."""
    async def main():
        slots = FairSlots(8, byte_budget=100)
        slots.register("a")
        slots.set_need("a", 4)
        inside: dict[str, int] = {}
        done = {name: asyncio.Event() for name in ("s1", "s2", "big", "huge")}

        async def file(name, cost):
            async with slots.slot("a", cost):
                inside[name] = cost
                await done[name].wait()
                del inside[name]

        tasks = [asyncio.ensure_future(file(n, c)) for n, c in
                 [("s1", 30), ("s2", 30), ("big", 60), ("huge", 500)]]
        await asyncio.sleep(0.01)
        assert set(inside) == {"s1", "s2"}  # 60 + 60 would exceed 100
        done["s1"].set()
        await asyncio.sleep(0.01)
        assert set(inside) == {"s2", "big"}
        done["s2"].set()
        done["big"].set()
        await asyncio.sleep(0.01)
        assert set(inside) == {"huge"}  # over the budget alone, once nothing else is in flight
        done["huge"].set()
        await asyncio.gather(*tasks)
    asyncio.run(main())
