"""The --max-parallel slots: a hard cap, shared fairly between clusters."""

import asyncio

import pytest

from async_embed_sync.sync import FairSlots


def test_cap_and_fair_share():
    async def scenario():
        slots = FairSlots(4)
        in_flight = {"busy": 0, "quiet": 0}
        peak = {"total": 0, "quiet_while_busy": 0}
        release = asyncio.Event()

        async def job(owner):
            async with slots.slot(owner):
                in_flight[owner] += 1
                peak["total"] = max(peak["total"], sum(in_flight.values()))
                peak["quiet_while_busy"] = max(peak["quiet_while_busy"], in_flight["quiet"])
                await release.wait()
                await asyncio.sleep(0)
                in_flight[owner] -= 1

        # The busy cluster queues 32 files before the quiet one queues 4.
        tasks = [asyncio.create_task(job("busy")) for _ in range(32)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(job("quiet")) for _ in range(4)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return peak

    peak = asyncio.run(scenario())
    assert peak["total"] == 4
    # Freed slots go to the cluster holding fewer, so the quiet one reaches
    # half the slots instead of waiting for all 32 busy files.
    assert peak["quiet_while_busy"] >= 2


def test_cancelled_waiter_does_not_leak_a_slot():
    async def scenario():
        slots = FairSlots(1)
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
