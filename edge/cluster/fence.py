"""The node's lease as the SIP workers see it: one record in the node's LMDB (docs/cluster.md).

The cluster agent (edge/cluster/agent.py, its own process) holds the lease in the engine and
writes what it believes into the ``cluster`` table: the instant its belief ends, on the
machine's ``CLOCK_MONOTONIC`` (one clock for every process of the machine), and the boot it
belongs to. A worker admits a call only before that instant, so the fencing argument of
edge/cluster/membership.py carries over unchanged: the holder's workers stop believing no
later than the agent does, which is before the engine can age the lease out.

Every way the record can be wrong errs towards refusing: an agent that dies leaves an instant
that passes by itself; a record of an earlier boot (the monotonic clock starts again at 0) is
ignored; a worker that caches the record keeps an *older* instant, never a later one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import msgspec

from edge.control.store import Store, Txn

TABLE = "cluster"
KEY = b"lease"
REREAD_SECONDS = 0.2        # a worker reads the record again after this long (a cached one only errs early)


class LeaseRecord(msgspec.Struct, frozen=True):
    node: str
    epoch: str
    boot: str                   # /proc/sys/kernel/random/boot_id: held_until means nothing after a reboot
    held_until: float           # CLOCK_MONOTONIC seconds; 0: fenced
    written_at: float           # unix seconds (for people: `sipedge status`)
    agent: int                  # pid of the agent that wrote it
    members: list[str] = []     # nodes whose lease lives, as the agent sees them
    homed: int = 0              # profiles this node is home of


@cache
def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:         # not Linux: nothing to tell boots apart with, and the record then never admits
        return ""


def write(store: Store, record: LeaseRecord) -> None:
    def put(txn: Txn) -> None:
        txn.put(TABLE, KEY, record)

    # not synced: after a crash the instant has passed, after a reboot the boot differs
    store.write(put, sync=False, grows=False)


def read(store: Store) -> LeaseRecord | None:
    return store.read(lambda txn: txn.get(TABLE, KEY, LeaseRecord))


def clear(store: Store) -> None:
    store.write(lambda txn: txn.delete(TABLE, KEY), sync=False, grows=False)


def held_for(record: LeaseRecord | None, now: float | None = None) -> float:
    """Seconds the record lets this node admit calls from ``now`` (monotonic); 0 when it does not."""
    if record is None or not record.boot or record.boot != boot_id():
        return 0.0
    now = time.monotonic() if now is None else now
    return max(0.0, record.held_until - now)


class Fence:
    """Asked by admission before each call is seized: does this node hold its cluster lease now?"""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._until = 0.0           # monotonic instant of the cached record's belief
        self._read_at = -1e9
        self.epoch = ""             # of the cached record: calls admitted under one epoch end when it changes

    def admits(self) -> bool:
        now = self.clock()
        if now - self._read_at >= REREAD_SECONDS or now >= self._until:
            self._read_at = now
            record = read(self.store)
            self._until = now + held_for(record, now)
            self.epoch = record.epoch if record is not None and self._until > now else ""
        return now < self._until
