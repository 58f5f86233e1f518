"""Prefix tables (SPEC §3): the rate table and the US bundle exclusions, longest prefix wins.

Each table is replaced as a whole in one transaction, with the list of its prefix
lengths (``meta:rate_lengths``, ``meta:exclusion_lengths``: one byte per length, longest
first), so a call rated during a load sees the old table or the new one, never a mix, and
a lookup tries only the lengths present: a handful of ``get`` calls in one read transaction.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from .errors import Invalid
from .models import Rate
from .store import Store, Txn, reads, writes

RATE_LENGTHS = b"rate_lengths"
EXCLUSION_LENGTHS = b"exclusion_lengths"
_rate = msgspec.msgpack.Decoder(Rate)   # the call path's own decoder


def _replace_table(txn: Txn, db: str, lengths_key: bytes, rows: Iterable[tuple[bytes, bytes]]) -> int:
    """Replace every row of ``db`` and index the key lengths in ``meta[lengths_key]``.

    :raises Invalid: a prefix appears twice (the transaction aborts: the old table stays).
    """
    txn.clear(db)
    lengths: set[int] = set()
    count = 0
    for k, value in rows:
        if not txn.put_raw(db, k, value, overwrite=False):
            raise Invalid(f"prefix {k.decode()} appears twice", field="prefix")
        lengths.add(len(k))
        count += 1
    txn.put_raw("meta", lengths_key, bytes(sorted(lengths, reverse=True)))
    return count


# The two lookups below run on the call path: inline, on bound handles, no Txn built.

def rate_for(store: Store, number: str) -> Rate | None:
    """Call path: the rate of ``number`` (E.164, with or without "+"), longest prefix wins."""
    digits = (number[1:] if number.startswith("+") else number).encode()
    dbs = store.dbs
    with store.env.begin() as txn:
        table = dbs.rates
        for n in txn.get(RATE_LENGTHS, db=dbs.meta) or b"":
            if n <= len(digits):
                raw = txn.get(digits[:n], db=table)
                if raw is not None:
                    return _rate.decode(raw)
    return None


def is_bundle_excluded(store: Store, number: str) -> bool:
    """Call path: True if ``number`` falls under one of the US prefixes bundles never cover."""
    digits = (number[1:] if number.startswith("+") else number).encode()
    dbs = store.dbs
    with store.env.begin() as txn:
        table = dbs.exclusions
        return any(n <= len(digits) and txn.get(digits[:n], db=table) is not None
                   for n in txn.get(EXCLUSION_LENGTHS, db=dbs.meta) or b"")


@writes()
def replace(txn: Txn, rates: Iterable[Rate]) -> int:
    """Replace the whole rate table; :returns: the number of rates.

    :raises Invalid: a prefix appears twice (the old table stays).
    """
    enc = txn.store.encode
    return _replace_table(txn, "rates", RATE_LENGTHS, ((r.prefix.encode(), enc(r)) for r in rates))


@reads
def count(txn: Txn) -> int:
    return txn.entries("rates")


@writes()
def replace_exclusions(txn: Txn, prefixes: Iterable[str]) -> int:
    """Replace the US bundle exclusions (digits with the country code 1); :returns: how many."""
    return _replace_table(txn, "exclusions", EXCLUSION_LENGTHS, ((p.encode(), b"") for p in prefixes))


@writes()
def ensure_exclusions(txn: Txn, default: Iterable[str]) -> bool:
    """Load ``default`` if the exclusion table was never set (an API replace, even to an
    empty list, counts as set). :returns: True if it loaded them."""
    if txn.get_raw("meta", EXCLUSION_LENGTHS) is not None:
        return False
    replace_exclusions(txn, default)
    return True


@reads
def exclusions(txn: Txn) -> list[str]:
    return [k.decode() for k, _ in txn.scan("exclusions")]
