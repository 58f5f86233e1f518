"""Operator actions on live calls (SPEC §5.5): a hang-up request written to LMDB by the control
API and carried out by the process that owns the call (``edge/calls/events.py`` polls them),
so it works whichever process serves the API."""

from __future__ import annotations

import time

from . import channels, profiles
from .errors import CallNotFound
from .models import HangupRequest
from .store import Txn, new_id, reads, writes

DONE_TTL = 3600.0   # seconds a finished request stays readable


@writes()
def request_hangup(txn: Txn, call_id: str, *, cause: int = 487, key_id: str = "",
                   account_id: str | None = None) -> HangupRequest:
    """Ask the call's owner to end ``call_id``.

    :param account_id: the caller's account scope: a call of another account is "not found".
    :raises CallNotFound: no such live call (or not one of ``account_id``'s).
    """
    live = channels.find_call(txn, call_id)
    prof = profiles.find(txn, live.profile_id) if live is not None else None
    if live is None or prof is None or (account_id is not None and prof.account_id != account_id):
        raise CallNotFound(f"no live call {call_id}")
    req = HangupRequest(id=new_id("hup"), call_id=call_id, profile_id=prof.id, account_id=prof.account_id,
                        cause=cause, requested_at=time.time(), key_id=key_id)
    txn.put("hangups", req.id.encode(), req)
    return req


@reads
def pending(txn: Txn) -> list[HangupRequest]:
    return [r for r in txn.values("hangups", HangupRequest) if r.state == "pending"]


@reads
def has_pending(txn: Txn) -> bool:
    """Cheap check for the poller: any request at all (done ones are purged after ``DONE_TTL``)."""
    return txn.entries("hangups") > 0


@writes(sync=False, grows=False)
def finish(txn: Txn, req_id: str, state: str) -> None:
    """Mark a request ``done`` (the call was ended) or ``gone`` (it had ended already), and
    forget requests finished more than ``DONE_TTL`` ago."""
    req = txn.get("hangups", req_id.encode(), HangupRequest)
    now = time.time()
    if req is not None:
        req.state, req.done_at = state, now  # type: ignore[assignment]
        txn.put("hangups", req.id.encode(), req)
    for old in list(txn.values("hangups", HangupRequest)):
        if old.done_at is not None and old.done_at < now - DONE_TTL:
            txn.delete("hangups", old.id.encode())
