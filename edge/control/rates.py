"""Prefix tables (SPEC §3): the rate table and the US bundle exclusions, longest prefix wins.

Each table is replaced as a whole in one transaction, with the list of its prefix
lengths (``meta:rate_lengths``, ``meta:exclusion_lengths``), so a call rated during a
load sees the old table or the new one, never a mix, and a lookup tries only the lengths
present (:meth:`edge.control.store.Store.longest_prefix`).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from .models import Rate
from .store import Store, Txn, reads, writes

RATE_LENGTHS = b"rate_lengths"
EXCLUSION_LENGTHS = b"exclusion_lengths"
_rate = msgspec.msgpack.Decoder(Rate)   # the call path's own decoder


def _digits(number: str) -> bytes:
    return (number[1:] if number.startswith("+") else number).encode()


def rate_for(store: Store, number: str) -> Rate | None:
    """Call path: the rate of ``number`` (E.164, with or without "+"), longest prefix wins."""
    raw = store.longest_prefix("rates", RATE_LENGTHS, _digits(number))
    return None if raw is None else _rate.decode(raw)


def is_bundle_excluded(store: Store, number: str) -> bool:
    """Call path: True if ``number`` falls under one of the US prefixes bundles never cover."""
    return store.longest_prefix("exclusions", EXCLUSION_LENGTHS, _digits(number)) is not None


@writes()
def replace(txn: Txn, rates: Iterable[Rate]) -> int:
    """Replace the whole rate table; :returns: the number of rates.

    :raises Invalid: a prefix appears twice (the old table stays).
    """
    enc = txn.store.encode
    return txn.replace_prefix_table("rates", RATE_LENGTHS, ((r.prefix.encode(), enc(r)) for r in rates))


@reads
def count(txn: Txn) -> int:
    return txn.entries("rates")


@writes()
def replace_exclusions(txn: Txn, prefixes: Iterable[str]) -> int:
    """Replace the US bundle exclusions (digits with the country code 1); :returns: how many."""
    return txn.replace_prefix_table("exclusions", EXCLUSION_LENGTHS, ((p.encode(), b"") for p in prefixes))


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
