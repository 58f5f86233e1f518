"""``Idempotency-Key`` of money-moving POSTs (SPEC §5): the first answer is stored in the
transaction that moved the money, and replayed for a retry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .errors import IdempotencyKeyReused
from .models import IdempotentResult
from .store import Txn, reads, writes

T = TypeVar("T")


@writes()
def run_once(
    txn: Txn,
    idem_key: str,
    fingerprint: str,
    fn: Callable[[Txn], T],
    render: Callable[[T], tuple[int, bytes]],
) -> tuple[int, bytes, bool]:
    """Run a money-moving ``fn`` at most once per ``idem_key``.

    The first success is rendered and stored in the same transaction as the money
    movement, so a retry (even racing the first request, even in another process)
    gets the stored answer and moves nothing. A failure stores nothing: a retry
    re-evaluates. A key reused with another request is a conflict.

    :param fingerprint: what identifies the request (method, path, body hash).
    :returns: (status, body, replayed)
    :raises IdempotencyKeyReused: the key was used for another request.
    """
    prior = txn.get("idempotency", idem_key.encode(), IdempotentResult)
    if prior is not None:
        if prior.fingerprint != fingerprint:
            raise IdempotencyKeyReused("Idempotency-Key was already used for a different request")
        return prior.status, prior.body, True
    status, body = render(fn(txn))
    txn.put("idempotency", idem_key.encode(),
            IdempotentResult(fingerprint=fingerprint, status=status, body=body, created_at=time.time()))
    return status, body, False


@reads
def prior(txn: Txn, idem_key: str, fingerprint: str) -> IdempotentResult | None:
    """The stored answer of ``idem_key``, if any. :raises IdempotencyKeyReused: it was another request's."""
    found = txn.get("idempotency", idem_key.encode(), IdempotentResult)
    if found is not None and found.fingerprint != fingerprint:
        raise IdempotencyKeyReused("Idempotency-Key was already used for a different request")
    return found


@writes(grows=False)
def purge(txn: Txn, older_than: float) -> int:
    """Forget keys stored before ``older_than`` (Unix seconds); :returns: how many."""
    decode = txn.store.decoder(IdempotentResult).decode
    return txn.delete_where("idempotency", b"", lambda v: decode(v).created_at < older_than)
