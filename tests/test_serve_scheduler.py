"""The server's scheduler on its own: admission, FIFO order, adapter switches only while idle, cancellation."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from tunelab.inference.server import QueueFull, Scheduler  # noqa: E402


class FakeHost:
    def __init__(self):
        self.switches = []

    def activate(self, name):
        self.switches.append(name)


def test_same_model_runs_together_others_wait_their_turn():
    async def main():
        host = FakeHost()
        s = Scheduler(host, max_active=2, max_queue=3)
        await s.acquire("a")
        await s.acquire("a")  # same adapter: runs alongside
        started = []

        async def wait(name):
            await s.acquire(name)
            started.append(name)

        tasks = [asyncio.create_task(wait(n)) for n in ("b", "a", "a")]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):  # 2 running + 3 queued: the 6th is refused at once
            await s.acquire("a")
        assert s.waiting == 3 and started == []
        s.release()
        await asyncio.sleep(0)
        assert started == []  # "b" waits for the model to be idle, and the "a"s behind it keep their place
        s.release()
        await asyncio.sleep(0)
        assert started == ["b"] and host.switches[-1] == "b"
        s.release()
        await asyncio.gather(*tasks)
        assert started == ["b", "a", "a"] and s.active == 2 and s.waiting == 0
        assert host.switches == ["a", "b", "a"]

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue():
    async def main():
        s = Scheduler(FakeHost(), max_active=1, max_queue=2)
        await s.acquire("a")
        waiter = asyncio.create_task(s.acquire("b"))
        await asyncio.sleep(0)
        assert s.waiting == 1
        waiter.cancel()
        s.release()  # the freed slot must not go to the cancelled request
        await asyncio.gather(waiter, return_exceptions=True)
        assert s.waiting == 0 and s.active == 0
        await asyncio.wait_for(s.acquire("c"), 1)
        assert s.active == 1

    asyncio.run(main())
