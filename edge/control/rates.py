"""Prefix tables (SPEC §3): the rate table and the US bundle exclusions, longest prefix wins.

Each table comes with the list of its prefix lengths (``meta:rate_lengths``,
``meta:exclusion_lengths``: one byte per length, longest first), so a lookup tries only the
lengths present: a handful of ``get`` calls in one read transaction.

The rate table is double-buffered: ``rates`` and ``rates_b``, and ``meta:rate_table`` names
the one calls are rated from (absent: ``rates``). A new table is written into the other one
— by :func:`load` in chunks of :data:`LOAD_CHUNK` rows, each its own short write
transaction, so a 100,000-row upload never holds LMDB's one writer lock (which every SIP
worker's call path shares) for more than a few milliseconds at a time — and a last short
transaction switches ``meta:rate_table`` over: a call rated during a load sees the old table
or the new one, never a mix. The exclusions are small and replaced in one transaction.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Sequence

import msgspec

from .errors import Invalid
from .models import Rate
from .store import Store, Txn, reads, writes

RATE_LENGTHS = b"rate_lengths"
EXCLUSION_LENGTHS = b"exclusion_lengths"
RATE_TABLE = b"rate_table"      # meta: b"b" while rates_b is the table calls are rated from
RATE_LOADING = b"rate_loading"  # meta: the token of the chunked load writing the other table now
LOAD_CHUNK = 2000               # rows per write transaction of a chunked load (~10 ms of the writer lock)
# per half of the double buffer: its database, and the meta key of its prefix lengths
_HALVES = {b"": ("rates", RATE_LENGTHS), b"b": ("rates_b", RATE_LENGTHS + b"_b")}
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
        if txn.get(RATE_TABLE, db=dbs.meta) == b"b":
            table, lengths = dbs.rates_b, RATE_LENGTHS + b"_b"
        else:
            table, lengths = dbs.rates, RATE_LENGTHS
        for n in txn.get(lengths, db=dbs.meta) or b"":
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


def _active(txn: Txn) -> bytes:
    return b"b" if txn.get_raw("meta", RATE_TABLE) == b"b" else b""


def _other(txn: Txn) -> bytes:
    return b"" if _active(txn) == b"b" else b"b"


@writes()
def replace(txn: Txn, rates: Iterable[Rate]) -> int:
    """Replace the whole rate table in this one transaction; :returns: the number of rates.

    :raises Invalid: a prefix appears twice (the old table stays).
    """
    enc = txn.store.encode
    half = _other(txn)
    db, lengths = _HALVES[half]
    count = _replace_table(txn, db, lengths, ((r.prefix.encode(), enc(r)) for r in rates))
    txn.put_raw("meta", RATE_TABLE, half)
    txn.delete("meta", RATE_LOADING)   # a chunked load still writing the other half loses
    return count


def load(store: Store, rates: Sequence[Rate], chunk: int = LOAD_CHUNK) -> int:
    """Replace the whole rate table in chunks of ``chunk`` rows (module docstring): the
    API's path for large tables. :returns: the number of rates.

    :raises Invalid: a prefix appears twice, or another load replaced the table meanwhile
        (either way the table in use stays what it was, or what the other load made it).
    """
    token = secrets.token_bytes(8)
    enc = store.encode

    def begin(txn: Txn) -> bytes:
        half = _other(txn)
        txn.clear(_HALVES[half][0])
        txn.put_raw("meta", RATE_LOADING, token)
        return half

    half = store.write(begin, sync=False)
    db, lengths_key = _HALVES[half]
    lengths: set[int] = set()

    def ours(txn: Txn) -> None:
        if txn.get_raw("meta", RATE_LOADING) != token:
            raise Invalid("another rate table load started meanwhile; this one was abandoned", field="rates")

    def rows(txn: Txn, part: Sequence[Rate]) -> None:
        ours(txn)
        for rate in part:
            k = rate.prefix.encode()
            if not txn.put_raw(db, k, enc(rate), overwrite=False):
                raise Invalid(f"prefix {rate.prefix} appears twice", field="prefix")
            lengths.add(len(k))

    def switch(txn: Txn) -> None:
        ours(txn)
        txn.put_raw("meta", lengths_key, bytes(sorted(lengths, reverse=True)))
        txn.put_raw("meta", RATE_TABLE, half)
        txn.delete("meta", RATE_LOADING)

    try:
        for start in range(0, len(rates), chunk):
            store.write(functools.partial(rows, part=rates[start:start + chunk]), sync=False)
        store.write(switch)   # durable: the table in use changes here
    except BaseException:
        def abandon(txn: Txn) -> None:
            if txn.get_raw("meta", RATE_LOADING) == token:
                txn.delete("meta", RATE_LOADING)
        try:
            store.write(abandon, sync=False, grows=False)
        except Exception:
            pass   # the token stays; the next load replaces it
        raise
    return len(rates)


@reads
def count(txn: Txn) -> int:
    return txn.entries(_HALVES[_active(txn)][0])


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
