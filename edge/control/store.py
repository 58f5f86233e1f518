"""The LMDB plumbing: one environment shared by every process of a node.

This module knows databases, keys, codecs and transactions, and nothing about accounts,
money or calls. The domain lives in modules beside it (``accounts``, ``profiles``,
``ledger``, ``numbers``, ``registrations``, ``channels``, ``bundles``, ``cdrs``,
``rates``, ``idempotency``), all built the same way:

- **Transaction-scoped functions** ``f(txn, ...)`` take an open :class:`Txn` and run
  inside it, so a caller composes several of them into one atomic change::

      store.write(lambda txn: ledger.move(txn, profiles.get(txn, pid), -cost, "call", call_id),
                  sync=False, grows=False)

- Most of them are decorated with :func:`reads` or :func:`writes`: given the
  :class:`Store` instead of a :class:`Txn`, they open a transaction of their own
  (``accounts.create(store, "Acme", "acme.admin")``). ``@writes`` names the policy of that
  transaction — ``grows`` and ``sync``, below — next to the operation it belongs to. A
  function called with a ``Txn`` runs under the policy of whoever opened the transaction.
- **Call-path lookups** (``profiles.credential``, ``numbers.profile_by_number``,
  ``rates.rate_for``, ``rates.is_bundle_excluded``) take the store, open one short read
  transaction on the bound database handles (``store.dbs``) and do one to a few
  ``get`` calls with module-level decoders: microseconds, no ``Txn`` built.

Every write is one LMDB write transaction (:meth:`Store.write`): ``fn`` returns and the
transaction commits, or anything raises and it aborts, so no reader in any process ever
sees half a change; writers in different processes (the edge, the control API, a CLI) are
serialised by LMDB's own lock.

A store that cannot write
-------------------------
LMDB's map is a fixed-size file (``storage.map_size_mb``). :meth:`Store.write` turns
``lmdb.MapFullError`` (the map is full) and ``lmdb.DiskError`` (ENOSPC: the disk is) into
:class:`~edge.control.errors.StoreFull`, and any other LMDB error (I/O, a failed fsync)
into :class:`~edge.control.errors.StoreUnavailable`; either way the transaction aborted
and nothing of it was written.

A map that filled up with provisioning must still have room to *finish* the calls in
progress (slice extensions, settlement, CDRs, channel release), so the top of the map is
a **reserve**: ``max(2 MiB, 5 % of the map)``. A write opened with ``grows=True`` (the
default: control-API writes, call admission, registrations — new work) is refused with
``StoreFull`` when the store's fill would be above ``map_size - reserve`` after it; a write
opened with ``grows=False`` (work already admitted, and deletions) may use the reserve.
The fill (:meth:`Store.used_bytes`) is the pages in use in every database times the page
size, measured at most once a second (and after every refusal). A durable grows write, and
any grows write once the fill is within one reserve of the limit, measures it exactly in
its own transaction before committing; a small call-path write far below the limit trusts
the last measure. The first refusal of an episode is logged once (WARNING, with the path
and the map size); the end of it (a grows write committed with room to spare) once (INFO).

``docs/storage.md`` lists every database with its keys and values.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

import lmdb
import msgspec

from .errors import Invalid, StoreFull, StoreUnavailable

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger("sipedge.store")

# Named databases. If you add one, document it in docs/storage.md.
DB_NAMES = (
    "accounts",        # account id -> Account
    "admins",          # admin login -> account id (logins are unique; never attachable)
    "profiles",        # profile id -> Profile
    "credentials",     # SIP username -> Credential
    "numbers",         # E.164 "+..." -> OnlineNumber
    "business",        # business account name -> BusinessAccount
    "rates",           # prefix digits -> Rate (one half of the rate table's double buffer)
    "rates_b",         # the other half: meta:rate_table says which one calls are rated from
    "exclusions",      # prefix digits (with country code 1) -> b"" (US bundle exclusions)
    "registrations",   # profile id \0 contact -> Registration
    "calls",           # profile id \0 call id -> LiveCall
    "channels",        # profile id -> channels in use, u64 big-endian
    "ledger",          # owner \0 seq u64 BE -> LedgerEntry
    "cdrs",            # profile id \0 seq u64 BE -> Cdr
    "bundle_usage",    # profile id \0 "YYYY-MM" -> seconds used, u64 BE
    "idempotency",     # Idempotency-Key -> IdempotentResult
    "api_keys",        # key id -> ApiKey (hashed secret)
    "audit",           # seq u64 BE -> AuditEntry (every control-API write)
    "webhooks",        # account id \0 webhook id -> Webhook
    "outbox",          # seq u64 BE -> OutboxEvent (undelivered webhook events)
    "deliveries",      # webhook id \0 event seq u64 BE -> Delivery (the delivery log)
    "hangups",         # hang-up request id -> HangupRequest (operator actions for the call owner)
    "console_passwords",  # account id -> AdminPassword (scrypt of the console password)
    "console_sessions",   # SHA-256 of the session token -> ConsoleSession
    "console_signins",    # login (or "key@<source>") -> SignInFailures (lockout)
    "journal_outbox",  # profile id \0 call id -> b"": settled here, not yet in the cluster's journal
    "held_cdrs",       # profile id \0 call id -> Cdr: a cluster node's CDR until the journal says whose it is
    "foreign_calls",   # call id -> LiveCall: a dead node's answered call whose legs this node BYEs
    "cluster_calls",   # profile id \0 call id -> RemoteCall: the live calls of the other cluster nodes
    "cluster_money",   # "p:<profile id>" | "a:<account id>" -> u64 BE: the journal's last sequence in the ledger
    "cluster",         # "lease" -> LeaseRecord: the cluster agent's lease as the workers see it (edge/cluster/fence.py)
    "meta",            # counters and index shapes (see docs/storage.md)
)

SEP = b"\x00"
MIN_RESERVE = 2 << 20          # bytes kept for finishing admitted work, at least
RESERVE_FRACTION = 20          # ... or 1/20 (5 %) of the map, whichever is larger
FILL_TTL = 1.0                 # seconds a measured fill level is trusted


def u64(n: int) -> bytes:
    """A counter as stored: 8 bytes big-endian, so keys sort by it."""
    return n.to_bytes(8, "big")


def from_u64(b: bytes | None) -> int:
    return int.from_bytes(b, "big") if b else 0


def key(*parts: str | bytes) -> bytes:
    """A composite key: the parts joined by ``\\0`` (``key(profile_id, call_id)``)."""
    return SEP.join([p.encode() if isinstance(p, str) else p for p in parts])  # a list: join makes one of a generator


def new_id(prefix: str) -> str:
    """A random record id such as ``acc_1f0c9a...`` (16 hex digits)."""
    return f"{prefix}_{secrets.token_hex(8)}"


class Replicator(Protocol):
    """Takes a store's writes (:attr:`Store.replicator`): a cluster node's control API."""

    def write(self, fn: Callable[[Txn], T], *, sync: bool, grows: bool) -> T: ...


class Txn:
    """An open LMDB transaction with the store's database handles and codecs.

    Databases are named by their ``DB_NAMES`` entry; values are msgspec Structs encoded
    as MessagePack (``get``/``put``) or raw bytes (``get_raw``/``put_raw``).
    ``raw`` is the ``lmdb.Transaction`` itself.
    """

    __slots__ = ("raw", "store", "writable")

    def __init__(self, store: Store, raw: lmdb.Transaction, writable: bool) -> None:
        self.store = store
        self.raw = raw
        self.writable = writable

    # -- records

    def get(self, db: str, k: bytes, cls: type[T]) -> T | None:
        raw = self.raw.get(k, db=self.store._db[db])
        return None if raw is None else self.store.decoder(cls).decode(raw)

    def put(self, db: str, k: bytes, value: msgspec.Struct) -> None:
        self.raw.put(k, self.store._enc.encode(value), db=self.store._db[db])

    def get_raw(self, db: str, k: bytes) -> bytes | None:
        return cast("bytes | None", self.raw.get(k, db=self.store._db[db]))   # bytes: the env has buffers=False

    def put_raw(self, db: str, k: bytes, value: bytes, *, overwrite: bool = True) -> bool:
        """:returns: False if ``overwrite`` is False and the key exists (nothing written)."""
        return bool(self.raw.put(k, value, db=self.store._db[db], overwrite=overwrite))

    def delete(self, db: str, k: bytes) -> bool:
        """:returns: True if the key existed."""
        return bool(self.raw.delete(k, db=self.store._db[db]))

    def clear(self, db: str) -> None:
        """Delete every record of ``db`` (the database itself stays)."""
        self.raw.drop(self.store._db[db], delete=False)

    def entries(self, db: str) -> int:
        return int(self.raw.stat(self.store._db[db])["entries"])

    # -- u64 values (counters, channel counts, bundle seconds)

    def get_u64(self, db: str, k: bytes) -> int:
        return from_u64(self.get_raw(db, k))

    def put_u64(self, db: str, k: bytes, n: int) -> None:
        self.raw.put(k, u64(n), db=self.store._db[db])

    def add_u64(self, db: str, k: bytes, delta: int) -> int:
        """Add ``delta`` to the u64 at ``k`` (absent = 0, never below 0); :returns: the new value."""
        n = max(0, self.get_u64(db, k) + delta)
        self.put_u64(db, k, n)
        return n

    def counter(self, name: bytes) -> int:
        """The current value of a ``meta`` counter (0 if never incremented)."""
        return self.get_u64("meta", name)

    def next_counter(self, name: bytes) -> int:
        """Increment a ``meta`` counter; :returns: the new value (1 the first time)."""
        return self.add_u64("meta", name, 1)

    # -- ranges

    def _cursor(self, db: str, start: bytes) -> Iterator[tuple[bytes, bytes]] | None:
        """(key, raw value) pairs from the first key >= ``start`` on, or None if there is none."""
        cur = self.raw.cursor(db=self.store._db[db])
        return cast("Iterator[tuple[bytes, bytes]]", iter(cur)) if cur.set_range(start) else None

    def scan(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, raw value) of every record whose key starts with ``prefix``, in key order."""
        cur = self._cursor(db, prefix)
        if cur is None:
            return
        for k, value in cur:
            if not k.startswith(prefix):
                return
            yield k, value

    def values(self, db: str, cls: type[T], prefix: bytes = b"") -> Iterator[T]:
        decode = self.store.decoder(cls).decode
        return (decode(v) for _, v in self.scan(db, prefix))

    def delete_where(self, db: str, prefix: bytes, pred: Callable[[bytes], bool] | None = None) -> int:
        """Delete the records under ``prefix`` whose raw value satisfies ``pred`` (all if None)."""
        dead = [k for k, v in self.scan(db, prefix) if pred is None or pred(v)]
        for k in dead:
            self.delete(db, k)
        return len(dead)

    def page_after_key(self, db: str, cls: type[T], after: str = "", limit: int | None = None) -> list[T]:
        """Records in key order, those after the key ``after`` (a page cursor), at most ``limit``."""
        cur = self._cursor(db, after.encode() + SEP if after else b"")
        out: list[T] = []
        if cur is None:
            return out
        decode = self.store.decoder(cls).decode
        for _, value in cur:
            if limit is not None and len(out) >= limit:
                break
            out.append(decode(value))
        return out

    def scan_after_seq(self, db: str, prefix: bytes, cls: type[T], after: int = 0) -> Iterator[T]:
        """Records under ``prefix`` whose key ends in a u64 seq > ``after``, oldest first, lazily."""
        cur = self._cursor(db, prefix + u64(after + 1))
        if cur is None:
            return
        decode = self.store.decoder(cls).decode
        for k, value in cur:
            if not k.startswith(prefix):
                return
            yield decode(value)

    def page_after_seq(self, db: str, prefix: bytes, cls: type[T], after: int = 0, limit: int = 100) -> list[T]:
        """The first ``limit`` of :meth:`scan_after_seq`."""
        return list(itertools.islice(self.scan_after_seq(db, prefix, cls, after), limit))


def reads(fn: Callable[Concatenate[Txn, P], T]) -> Callable[Concatenate[Txn | Store, P], T]:
    """Decorate a read ``fn(txn, ...)``: called with the store, it runs in a read transaction of its own."""

    @functools.wraps(fn)
    def run(on: Txn | Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if isinstance(on, Txn):
            return fn(on, *args, **kwargs)
        return on.read(lambda txn: fn(txn, *args, **kwargs))

    return run


def writes(*, grows: bool = True, sync: bool = True) -> Callable[
        [Callable[Concatenate[Txn, P], T]], Callable[Concatenate[Txn | Store, P], T]]:
    """Decorate a write ``fn(txn, ...)``: called with the store, it runs in a write transaction
    of its own, opened with this ``grows``/``sync`` policy (see :meth:`Store.write`); called
    with a write ``Txn``, it joins it."""

    def decorate(fn: Callable[Concatenate[Txn, P], T]) -> Callable[Concatenate[Txn | Store, P], T]:
        @functools.wraps(fn)
        def run(on: Txn | Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
            if isinstance(on, Txn):
                assert on.writable, f"{fn.__name__} needs a write transaction"
                return fn(on, *args, **kwargs)
            return on.write(lambda txn: fn(txn, *args, **kwargs), grows=grows, sync=sync)

        run.__doc__ = (fn.__doc__ or "") + f"\n\n(Given the store: one write transaction, grows={grows}, sync={sync}.)"
        return run

    return decorate


class Store:
    """The node's LMDB environment: named databases, codecs, transactions, the fill level.

    :param path: directory of the environment (created if missing).
    :param map_size: maximum size of the map in bytes (a sparse file: costs nothing until used).
    :param durable: fsync after every write opened with ``sync=True`` (the default). Soft
        state on the call path commits with ``sync=False``: a *process* crash loses nothing
        committed (the pages are in the OS cache); an OS crash may lose the last such
        commits, which recovery rebuilds (docs/storage.md).
    :param readonly: open for reading only.
    :param reserve: bytes at the top of the map that only ``grows=False`` writes may use
        (default ``max(2 MiB, 5 % of the map)``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = 4 << 30,
        durable: bool = True,
        readonly: bool = False,
        reserve: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.durable = durable
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=len(DB_NAMES) + 4,
            max_readers=1024,
            sync=False,            # fsync is explicit, per write: see write()
            metasync=False,
            readonly=readonly,
            lock=True,
        )
        self.map_size = int(self.env.info()["map_size"])
        self.reserve = reserve if reserve is not None else max(MIN_RESERVE, self.map_size // RESERVE_FRACTION)
        self.limit = self.map_size - self.reserve   # the fill above which new work is refused
        self._page = int(self.env.stat()["psize"])
        self._db: dict[str, Any] = {name: self.env.open_db(name.encode(), create=not readonly) for name in DB_NAMES}
        #: The bound handle of every named database, as attributes (``store.dbs.credentials``):
        #: the call-path lookups use them on ``store.env`` directly, with no ``Txn`` to build.
        self.dbs = SimpleNamespace(**self._db)
        self._main = self.env.open_db(None)
        self._dec: dict[type, msgspec.msgpack.Decoder[Any]] = {}
        self._enc = msgspec.msgpack.Encoder()
        self._used = 0
        #: write transactions begun here, and the time they waited for the writer lock (bench/, /metrics)
        self.lock_waits = SimpleNamespace(writes=0, seconds=0.0, max=0.0)
        self._used_at = -FILL_TTL           # monotonic time of the last measure; < now - TTL: stale
        self._latch = threading.Lock()
        #: a cluster node's control API: takes every write (edge/cluster/provisioning.py)
        self.replicator: Replicator | None = None
        self._full = False                  # in a "store full" episode (logged once)
        self._broken = False                # in a "store unavailable" episode (logged once)

    def close(self) -> None:
        self.env.close()

    # ----------------------------------------------------------------- codecs

    def decoder(self, cls: type[T]) -> msgspec.msgpack.Decoder[T]:
        dec = self._dec.get(cls)
        if dec is None:
            dec = self._dec[cls] = msgspec.msgpack.Decoder(cls)
        return dec

    def encode(self, value: Any) -> bytes:
        return self._enc.encode(value)

    # ----------------------------------------------------------- transactions

    def read(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in a read transaction (a consistent snapshot; never blocks a writer)."""
        with self.env.begin() as raw:
            return fn(Txn(self, raw, False))

    def write(self, fn: Callable[[Txn], T], *, sync: bool = True, grows: bool = True) -> T:
        """Run ``fn`` in one write transaction: committed if it returns, aborted if it raises
        (see :meth:`write_here`). On a cluster node's control API, :attr:`replicator` takes the
        write: what ``fn`` changes in the cluster's provisioning goes through the engine
        (edge/cluster/provisioning.py)."""
        if self.replicator is not None:
            return self.replicator.write(fn, sync=sync, grows=grows)
        return self.write_here(fn, sync=sync, grows=grows)

    def write_here(self, fn: Callable[[Txn], T], *, sync: bool = True, grows: bool = True,
                   txn: type[Txn] | None = None) -> T:
        """Run ``fn`` in one write transaction of this node's LMDB: committed if it returns, aborted if it raises.

        :param sync: flush to disk before returning (money, API answers). Call-path soft
            state passes False: ~10 µs instead of an fsync (~0.4 ms here).
        :param grows: the write adds new work (control-API writes, call admission,
            registrations): refused with ``StoreFull`` if the fill would end above
            ``map_size - reserve``. False for writes that finish admitted work (slice
            extension, settlement, CDR, channel release) or delete: they may use the reserve.
        :raises StoreFull: no room (nothing was written).
        :raises StoreUnavailable: LMDB failed (I/O error, ...); nothing was written — or,
            if only the fsync after the commit failed, the change is committed but may not
            be on disk.
        :param txn: the transaction class ``fn`` gets (a recording one, for the replicator).
        """
        if grows and self.used_bytes() > self.limit:
            raise self._refuse(self._used)
        try:
            asked = time.perf_counter()
            begun = self.env.begin(write=True)   # waits for LMDB's writer lock (any process of the node)
            waited = time.perf_counter() - asked
            self.lock_waits.writes += 1
            self.lock_waits.seconds += waited
            if waited > self.lock_waits.max:
                self.lock_waits.max = waited
            with begun as raw:
                result = fn((txn or Txn)(self, raw, True))
                if grows and (sync or self._used > self.limit - self.reserve):
                    used = self._measure(raw)
                    if used > self.limit:
                        raise self._refuse(used)   # aborts: nothing of fn is written
        except lmdb.MapFullError:
            self._used_at = -FILL_TTL
            raise self._refuse(self.used_bytes(), "map") from None
        except lmdb.DiskError:   # ENOSPC: the file system is full before the map is
            raise self._refuse(self.used_bytes(), "disk") from None
        except lmdb.BadValsizeError:
            raise Invalid("a key or value is too long for the store") from None
        except lmdb.Error as exc:
            raise self._unavailable(exc) from exc
        if sync and self.durable:
            self.flush()
        if self._full and grows and self.used_bytes() < self.limit - self.reserve // 2:
            self._recovered()
        if self._broken:
            self._healed()
        return result

    def flush(self) -> None:
        """Flush commits made with ``sync=False`` to disk (the edge calls this periodically)."""
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise self._unavailable(exc) from exc

    # ------------------------------------------------------------ fill level

    def used_bytes(self, *, fresh: bool = False) -> int:
        """Bytes in use: the pages of every database times the page size. Measured at most
        once per ``FILL_TTL`` second (and after a refusal) unless ``fresh``."""
        now = time.monotonic()
        if fresh or now - self._used_at >= FILL_TTL:
            try:
                with self.env.begin() as raw:
                    self._measure(raw)
            except lmdb.Error as exc:
                raise self._unavailable(exc) from exc
            self._used_at = now
        return self._used

    def _measure(self, raw: lmdb.Transaction) -> int:
        pages = 2   # the two meta pages
        for handle in (self._main, *self._db.values()):
            st = raw.stat(handle)
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        self._used = pages * self._page
        self._used_at = time.monotonic()
        return self._used

    @property
    def is_full(self) -> bool:
        """True while new work is being refused (between a refusal and the next roomy grows write)."""
        return self._full

    def _refuse(self, used: int, cause: str = "reserve") -> StoreFull:
        """Latch a "store full" episode (logged once) and build the error for ``cause``:
        ``reserve`` (the write would enter the reserve), ``map`` (LMDB's map is full),
        ``disk`` (the file system is)."""
        self._used_at = -FILL_TTL   # measure again next time: a deletion may have made room
        with self._latch:
            first, self._full = not self._full, True
        mib, map_mib, reserve_mib = used / 2**20, self.map_size / 2**20, self.reserve / 2**20
        if cause == "disk":
            detail = "the store is full: the disk under it has no space left; the operator must free disk space"
        elif cause == "map":
            detail = (f"the store is full: its {map_mib:.0f} MiB map has no room for this write ({mib:.1f} MiB in "
                      "use); the operator must raise storage.map_size_mb (or purge old CDRs)")
        else:
            detail = (f"the store is full: this write would take it to {mib:.1f} MiB of its {map_mib:.0f} MiB map, "
                      f"into the last {reserve_mib:.0f} MiB kept for calls in progress, so new writes are refused; "
                      "the operator must raise storage.map_size_mb (or purge old CDRs)")
        if first:
            log.warning("the store is full (%s): refusing new work, keeping the reserve for calls in progress",
                        {"disk": "no space left on the disk", "map": "map full"}.get(cause, "reserve reached"),
                        extra={"event": "store_full", "path": str(self.path), "map_bytes": self.map_size,
                               "used_bytes": used, "reserve_bytes": self.reserve})
        return StoreFull(detail)

    def _recovered(self) -> None:
        with self._latch:
            was, self._full = self._full, False
        if was:
            log.info("store has room again: accepting new work", extra={
                "event": "store_room", "path": str(self.path), "map_bytes": self.map_size,
                "used_bytes": self._used})

    def _unavailable(self, exc: lmdb.Error) -> StoreUnavailable:
        with self._latch:
            first, self._broken = not self._broken, True
        if first:
            log.error("store cannot write: %s", exc, extra={
                "event": "store_unavailable", "path": str(self.path), "map_bytes": self.map_size})
        return StoreUnavailable(f"the store cannot write ({type(exc).__name__}): {exc}")

    def _healed(self) -> None:
        with self._latch:
            was, self._broken = self._broken, False
        if was:
            log.info("store writes again", extra={"event": "store_writes_again", "path": str(self.path)})
