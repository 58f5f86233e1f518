"""Writer processes for the journal races (tests/cluster/test_journal.py, bench/bench_journal.py).

Each worker is its own process with its own :class:`Engine` connection, so the only thing the
writers share is the engine: what keeps them exact is JetStream's per-subject check, not a
lock of ours or a shared event loop. They start together at a barrier.
"""

from __future__ import annotations

import asyncio
from multiprocessing.synchronize import Barrier
from typing import Any

from edge.cluster.engine import Engine
from edge.cluster.journal import ChannelsBusy, InsufficientCredit, JournalUnavailable, ProfileJournal
from edge.config import ClusterConfig


def reserve_worker(urls: list[str], profile_id: str, node: str, calls: list[str], amount: int, channels: int,
                   settle: bool, barrier: Barrier, results: Any) -> None:
    """Reserve each of ``calls`` (and settle it at once if ``settle``); put one
    ``(node, call_id, outcome, conflicts, ambiguous)`` per call on ``results`` (outcome "ok",
    "busy", "funds", "unavailable" or "ambiguous"; the journal's counters so far)."""
    async def run() -> None:
        engine = await Engine.connect(ClusterConfig(node=node, engine=urls, lease_seconds=2.0))
        try:
            journal = await ProfileJournal.open(engine, profile_id)
            barrier.wait(timeout=60)
            for call_id in calls:
                outcome = "ok"
                try:
                    await journal.reserve(call_id, node, amount, channels)
                    if settle:
                        await journal.settle(call_id, amount // 2)
                except ChannelsBusy:
                    outcome = "busy"
                except InsufficientCredit:
                    outcome = "funds"
                except JournalUnavailable as exc:
                    outcome = "ambiguous" if exc.__class__.__name__ == "JournalAmbiguous" else "unavailable"
                results.put((node, call_id, outcome, journal.conflicts, journal.ambiguous))
        finally:
            await engine.close()

    asyncio.run(run())
