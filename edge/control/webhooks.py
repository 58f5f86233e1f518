"""Webhooks (SPEC §5.3): endpoints per account, and the durable outbox of their events.

**A transactional outbox.** An event is written by :func:`emit` in the very write
transaction of its cause — ``call.started`` and ``channels.exhausted`` in the channel
seizure (:func:`edge.control.channels.take`), ``call.ended`` with the CDR in the settlement
(:meth:`edge.control.credit.CreditEngine.settle`), ``credit.low`` and ``auto_recharge.*`` in
:func:`edge.control.ledger.auto_recharge` — so the cause and its event commit together or
not at all: a crash loses no event, and the call path pays no transaction of its own (one
cursor lookup of the account's endpoints, and one ``put`` when one of them subscribed).

**Delivery** is not here: a deliverer (``admin_api/webhooks.py``, an asyncio task of the
process that serves the control API) reads the outbox from LMDB, POSTs each event to each
endpoint that subscribed, and keeps one :class:`Delivery` per (endpoint, event) with its
attempts — the delivery log. An event leaves the outbox when every endpoint has it or
gave up (24 h of retries).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import msgspec

from .errors import Invalid, NotFound
from .models import Delivery, OutboxEvent, Webhook
from .store import SEP, Txn, key, new_id, reads, u64, writes

EVENTS = ("call.started", "call.ended", "credit.low", "auto_recharge.succeeded", "auto_recharge.failed",
          "channels.exhausted")
MAX_PER_ACCOUNT = 10
_json = msgspec.json.Encoder()


def rfc3339(ts: float) -> str:
    from .times import rfc3339 as fmt

    return fmt(ts) or ""


# ---------------------------------------------------------------- endpoints

@writes()
def create(txn: Txn, account_id: str, url: str, events: list[str], secret: str | None = None,
           description: str = "") -> Webhook:
    """A new endpoint of ``account_id`` (``secret`` generated when not given).

    :raises Invalid: an unknown event, no event, too many endpoints.
    :raises NotFound: no such account.
    """
    from . import accounts

    accounts.get(txn, account_id)
    if not events:
        raise Invalid("subscribe to at least one event", field="events")
    for i, ev in enumerate(events):
        if ev not in EVENTS:
            raise Invalid(f"unknown event {ev!r}: one of {', '.join(EVENTS)}", field=f"events[{i}]")
    if sum(1 for _ in txn.scan("webhooks", account_id.encode() + SEP)) >= MAX_PER_ACCOUNT:
        raise Invalid(f"an account has at most {MAX_PER_ACCOUNT} webhooks", field="url")
    hook = Webhook(id=new_id("whk"), account_id=account_id, url=url, events=sorted(set(events)),
                   secret=secret or "whsec_" + secrets.token_urlsafe(24), created_at=time.time(),
                   description=description)
    txn.put("webhooks", key(account_id, hook.id), hook)
    return hook


@reads
def of_account(txn: Txn, account_id: str) -> list[Webhook]:
    return list(txn.values("webhooks", Webhook, account_id.encode() + SEP))


@reads
def get(txn: Txn, account_id: str, webhook_id: str) -> Webhook:
    hook = txn.get("webhooks", key(account_id, webhook_id), Webhook)
    if hook is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return hook


@reads
def find(txn: Txn, webhook_id: str) -> Webhook | None:
    """The endpoint of any account (the deliverer knows only ids)."""
    for hook in txn.values("webhooks", Webhook):
        if hook.id == webhook_id:
            return hook
    return None


@writes(grows=False)
def delete(txn: Txn, account_id: str, webhook_id: str) -> None:
    """Delete an endpoint and its delivery log; its undelivered events are dropped for it."""
    get(txn, account_id, webhook_id)
    txn.delete("webhooks", key(account_id, webhook_id))
    txn.delete_where("deliveries", webhook_id.encode() + SEP)


@writes(grows=False)
def delete_of_account(txn: Txn, account_id: str) -> None:
    for hook in of_account(txn, account_id):
        delete(txn, account_id, hook.id)


# ------------------------------------------------------------------- outbox

def emit(txn: Txn, account_id: str, event_type: str, order_key: str,
         data: dict[str, Any] | Callable[[], dict[str, Any]], now: float | None = None) -> OutboxEvent | None:
    """Write ``event_type`` to the outbox in ``txn`` if an endpoint of the account subscribed to it.

    Called inside the transaction of the event's cause (a seizure, a settlement, a ledger
    movement): both commit or neither. ``data`` may be a function that builds it: the call
    path passes one, so that with nobody listening (the usual case) it formats no CDR.
    :returns: the event, or None when nobody listens.
    """
    decode = txn.store.decoder(Webhook).decode
    targets = [hook.id for hook in (decode(v) for _, v in txn.scan("webhooks", account_id.encode() + SEP))
               if event_type in hook.events]
    if not targets:
        return None
    now = time.time() if now is None else now
    seq = txn.next_counter(b"outbox_seq")
    event_id = f"evt_{seq:012d}{secrets.token_hex(4)}"
    if callable(data):
        data = data()
    body = _json.encode({"id": event_id, "type": event_type, "created_at": rfc3339(now), "data": data})
    event = OutboxEvent(seq=seq, id=event_id, type=event_type, account_id=account_id, order_key=order_key,
                        webhooks=targets, created_at=now, body=body)
    txn.put("outbox", u64(seq), event)
    return event


@reads
def pending(txn: Txn, *, limit: int = 2000) -> list[OutboxEvent]:
    """The oldest undelivered events, in outbox order."""
    out: list[OutboxEvent] = []
    for event in txn.values("outbox", OutboxEvent):
        out.append(event)
        if len(out) >= limit:
            break
    return out


@reads
def outbox_size(txn: Txn) -> int:
    return txn.entries("outbox")


@reads
def delivery(txn: Txn, webhook_id: str, event_seq: int) -> Delivery | None:
    return txn.get("deliveries", webhook_id.encode() + SEP + u64(event_seq), Delivery)


def save_delivery(txn: Txn, rec: Delivery) -> None:
    txn.put("deliveries", rec.webhook_id.encode() + SEP + u64(rec.event_seq), rec)


def settle_event(txn: Txn, seq: int) -> None:
    """The event reached every endpoint (or they gave up): it leaves the outbox."""
    txn.delete("outbox", u64(seq))


@reads
def deliveries(txn: Txn, webhook_id: str, *, after: int = 0, limit: int = 100) -> list[Delivery]:
    """The delivery log of an endpoint, oldest event first (``after``: an event seq)."""
    return txn.page_after_seq("deliveries", webhook_id.encode() + SEP, Delivery, after, limit)


@writes(grows=False, sync=False)
def purge_log(txn: Txn, older_than: float) -> int:
    """Forget finished deliveries of events created before ``older_than``."""
    decode = txn.store.decoder(Delivery).decode
    return txn.delete_where("deliveries", b"",
                            lambda v: (d := decode(v)).state != "pending" and d.created_at < older_than)
