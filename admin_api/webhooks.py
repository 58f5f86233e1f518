"""The webhook deliverer: POSTs the events of the LMDB outbox (``edge/control/webhooks.py``).

It runs as an asyncio task of the process that serves the control API (started and
stopped with the app), because it needs nothing but the store: when the API moves to a
process of its own (issue 10), the deliverer moves with it and the call path keeps
writing the outbox as before. A lease in ``meta`` (``webhook_deliverer``) makes sure that
only one process of a node delivers at a time, whatever runs the API.

Each round (every ``interval`` seconds) it reads the oldest undelivered events and, per
endpoint, sends the due ones with ``httpx.AsyncClient``:

- ``Sipedge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``; the
  body is the event's stored JSON, the same bytes on every attempt, with a stable ``id``;
- a 2xx is delivered; anything else (an error status, a timeout, a refused connection)
  is retried after ``backoff * 2^(n-1)`` seconds (±10 % jitter, at most ``backoff_max``)
  until ``retry_for`` after the event was created, then it is ``failed``;
- **in order per call**: events with the same order key (a call id, a profile id) go to
  an endpoint one after another; a later one waits while an earlier one is pending.
  Other keys are not held up.

Delivery is at least once: a crash between the receiver's 2xx and the record of it
sends the event again (same id): receivers deduplicate by ``id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import random
import time
from dataclasses import dataclass

import httpx

from edge import __version__
from edge.control import webhooks
from edge.control.models import Delivery, DeliveryAttempt, OutboxEvent, Webhook
from edge.control.store import Store, Txn, from_u64, u64

log = logging.getLogger("sipedge.webhooks")

LEASE_KEY = b"webhook_deliverer"
MAX_ATTEMPTS_KEPT = 20


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Sipedge-Signature`` header value (SPEC §5.3)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@dataclass(slots=True)
class Settings:
    interval: float = 0.5
    backoff: float = 5.0
    backoff_max: float = 3600.0
    retry_for: float = 24 * 3600.0
    timeout: float = 10.0
    concurrency: int = 8


class Deliverer:
    def __init__(self, store: Store, settings: Settings | None = None) -> None:
        self.store = store
        self.settings = settings or Settings()
        self.owner = f"{os.getpid()}:{id(self)}".encode()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._client = httpx.AsyncClient(timeout=self.settings.timeout, follow_redirects=False,
                                             headers={"User-Agent": f"sipedge-webhooks/{__version__}"})
            self._task = asyncio.get_running_loop().create_task(self._run(), name="webhook-deliverer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        try:
            await asyncio.to_thread(self._release)
        except Exception:
            pass

    async def _run(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self._lease):
                    await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery round failed")
            await asyncio.sleep(self.settings.interval)

    def _lease(self) -> bool:
        """Hold the node's delivery lease (renewed each round, lost after 10 rounds unrenewed)."""
        now = time.time()
        ttl = max(5.0, 10 * self.settings.interval)

        def op(txn: Txn) -> bool:
            raw = txn.get_raw("meta", LEASE_KEY)
            if raw:
                holder, _, until = raw.rpartition(b"@")
                if holder != self.owner and from_u64(until) > now * 1000:
                    return False
            txn.put_raw("meta", LEASE_KEY, self.owner + b"@" + u64(int((now + ttl) * 1000)))
            return True

        if webhooks.outbox_size(self.store) == 0:
            return False
        return self.store.write(op, sync=False, grows=False)

    def _release(self) -> None:
        def op(txn: Txn) -> None:
            raw = txn.get_raw("meta", LEASE_KEY)
            if raw and raw.rpartition(b"@")[0] == self.owner:
                txn.delete("meta", LEASE_KEY)

        self.store.write(op, sync=False, grows=False)

    # --------------------------------------------------------------- rounds

    async def round(self) -> int:
        """One pass over the outbox. :returns: deliveries attempted."""
        now = time.time()
        events, hooks, states = await asyncio.to_thread(self._load)
        chains: dict[tuple[str, str], list[tuple[OutboxEvent, Webhook, Delivery]]] = {}
        blocked: set[tuple[str, str]] = set()
        for ev in events:
            for wid in ev.webhooks:
                hook = hooks.get(wid)
                state = states.get((wid, ev.seq))
                if hook is None or (state is not None and state.state != "pending"):
                    continue
                chain_key = (wid, ev.order_key)
                if chain_key in blocked:
                    continue
                if state is None:
                    state = Delivery(event_seq=ev.seq, event_id=ev.id, event_type=ev.type, webhook_id=wid,
                                     created_at=ev.created_at, next_attempt_at=ev.created_at)
                if state.next_attempt_at > now:
                    blocked.add(chain_key)       # an earlier event of this key waits: so do the later ones
                    continue
                chains.setdefault(chain_key, []).append((ev, hook, state))
        sem = asyncio.Semaphore(self.settings.concurrency)
        results: list[Delivery] = []

        async def run_chain(items: list[tuple[OutboxEvent, Webhook, Delivery]]) -> None:
            async with sem:
                for ev, hook, state in items:
                    ok = await self._attempt(ev, hook, state)
                    results.append(state)
                    if not ok:
                        return                   # the rest of this key waits for it

        await asyncio.gather(*(run_chain(c) for c in chains.values()))
        if results:
            await asyncio.to_thread(self._save, results, events, hooks)
        return len(results)

    def _load(self) -> tuple[list[OutboxEvent], dict[str, Webhook], dict[tuple[str, int], Delivery]]:
        def op(txn: Txn) -> tuple[list[OutboxEvent], dict[str, Webhook], dict[tuple[str, int], Delivery]]:
            events = webhooks.pending(txn)
            hooks = {h.id: h for h in txn.values("webhooks", Webhook)}
            states: dict[tuple[str, int], Delivery] = {}
            for ev in events:
                for wid in ev.webhooks:
                    d = webhooks.delivery(txn, wid, ev.seq)
                    if d is not None:
                        states[(wid, ev.seq)] = d
            return events, hooks, states

        return self.store.read(op)

    async def _attempt(self, ev: OutboxEvent, hook: Webhook, state: Delivery) -> bool:
        assert self._client is not None
        now = time.time()
        ts = int(now)
        headers = {"Content-Type": "application/json", "Sipedge-Signature": sign(hook.secret, ts, ev.body),
                   "Sipedge-Event-Id": ev.id, "Sipedge-Event-Type": ev.type}
        status, error = 0, ""
        start = time.perf_counter()
        try:
            resp = await self._client.post(hook.url, content=ev.body, headers=headers)
            status = resp.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        elapsed = (time.perf_counter() - start) * 1000
        state.attempts = [*state.attempts, DeliveryAttempt(at=now, status=status, error=error,
                                                           duration_ms=round(elapsed, 1))][-MAX_ATTEMPTS_KEPT:]
        if not error:
            state.state, state.delivered_at = "delivered", time.time()
            return True
        n = len(state.attempts)
        delay = min(self.settings.backoff * 2 ** (n - 1), self.settings.backoff_max) * random.uniform(0.9, 1.1)
        if now + delay > ev.created_at + self.settings.retry_for:
            state.state = "failed"
            log.warning("webhook event %s to %s given up after %d attempts", ev.id, hook.url, n,
                        extra={"event": "webhook_failed", "webhook_id": hook.id, "event_id": ev.id})
        else:
            state.next_attempt_at = now + delay
        return False

    def _save(self, results: list[Delivery], events: list[OutboxEvent], hooks: dict[str, Webhook]) -> None:
        by_seq = {ev.seq: ev for ev in events}

        def op(txn: Txn) -> None:
            for d in results:
                webhooks.save_delivery(txn, d)
            for seq in {d.event_seq for d in results}:
                ev = by_seq[seq]
                if all(hooks.get(w) is None or _done(webhooks.delivery(txn, w, seq)) for w in ev.webhooks):
                    webhooks.settle_event(txn, seq)

        self.store.write(op, sync=True, grows=False)


def _done(d: Delivery | None) -> bool:
    return d is not None and d.state != "pending"
