"""SipService's group fsync (edge/sip/core.py): flush requests within the gap share one fsync."""
from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge.config import Config
from edge.control.store import Store
from edge.sip.core import SipService
from edge.sip.dialog import Dialogs


async def until(cond, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


def test_requests_within_the_gap_ride_on_one_fsync_and_none_is_lost(tmp_path: Path) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        store = Store(tmp_path / "db", map_size=1 << 24)
        sip = SipService(Config(), store, CollectorRegistry(), loop, Dialogs(loop), flush_gap=1.5)
        flushes: list[float] = []
        real = store.flush

        def counting() -> None:
            flushes.append(loop.time())
            real()

        store.flush = counting  # type: ignore[method-assign]
        flusher = loop.create_task(sip._flush_periodically())
        try:
            sip.flush_soon()
            await until(lambda: len(flushes) == 1)
            for _ in range(50):  # calls ending one after the other, over ~50 ms
                sip.flush_soon()
                await asyncio.sleep(0.001)
            await until(lambda: len(flushes) >= 2)  # none of them lost...
            assert len(flushes) == 2  # ...and one fsync for the fifty (the next can come 1.5 s on)
        finally:
            flusher.cancel()
            store.close()

    asyncio.run(run())
