"""Store lookups on the call path, side by side with SQLite doing the same lookups.

A store with 10,000 profiles, 100,000 online numbers and a 100,000-prefix rate table;
per-lookup latency (p50/p99, ns) of: credential by SIP username, profile by online
number, longest-prefix rate. Each lookup is timed individually with perf_counter_ns
(its ~40 ns overhead is included and reported as ``timer_overhead_ns``).

    .venv/bin/python -m bench.bench_store [--lookups 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.common import machine_info, write_result
from edge.control.models import Credential, OnlineNumber, Profile, Rate
from edge.control.numbers import profile_by_number
from edge.control.profiles import SIP_USERNAME_BASE, credential
from edge.control.rates import rate_for
from edge.control.rates import replace as replace_rates
from edge.control.store import Store, Txn

PROFILES, NUMBERS, PREFIXES = 10_000, 100_000, 100_000


def build_dataset(seed: int = 7) -> tuple[list[Profile], list[OnlineNumber], list[Rate]]:
    rng = random.Random(seed)
    profiles = [Profile(id=f"prf_{i:016x}", account_id=f"acc_{i // 10:016x}", name=f"P{i}", channels=30,
                        auth="digest", sip_username=str(SIP_USERNAME_BASE + i + 1)) for i in range(PROFILES)]
    numbers = [OnlineNumber(number=f"+1{2000000000 + i * 7919 % 8000000000:010d}",
                            account_id=profiles[i % PROFILES].account_id, profile_id=profiles[i % PROFILES].id)
               for i in range(NUMBERS)]
    prefixes: set[str] = set()
    while len(prefixes) < PREFIXES:  # realistic shape: country codes plus many 4..9 digit ranges
        cc = rng.choice(["1", "44", "49", "33", "39", "34", "61", "81", "86", "91", "7", "55", "52", "234", "880"])
        prefixes.add(cc + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 7))))
    rates = [Rate(prefix=p, rate=rng.randint(1000, 500000), min_seconds=60, increment_seconds=6)
             for p in sorted(prefixes)]
    return profiles, numbers, rates


def populate_lmdb(path: str, profiles: list[Profile], numbers: list[OnlineNumber], rates: list[Rate]) -> Store:
    store = Store(path, durable=False, map_size=2 << 30)

    def op(txn: Txn) -> None:
        for p in profiles:
            txn.put("profiles", p.id.encode(), p)
            cred = Credential(profile_id=p.id, username=p.sip_username, password="x" * 16, realm="sip.edge.test",
                              ha1_md5="0" * 32, ha1_sha256="0" * 64)
            txn.put("credentials", p.sip_username.encode(), cred)
        for n in numbers:
            txn.put("numbers", n.number.encode(), n)

    store.write(op)
    replace_rates(store, rates)
    return store


def populate_sqlite(path: str, profiles: list[Profile], numbers: list[OnlineNumber],
                    rates: list[Rate]) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.executescript("""
        PRAGMA journal_mode=WAL;
        CREATE TABLE profiles (id TEXT PRIMARY KEY, account_id TEXT, name TEXT, channels INT,
                               balance INT) WITHOUT ROWID;
        CREATE TABLE credentials (username TEXT PRIMARY KEY, profile_id TEXT, ha1_md5 TEXT, ha1_sha256 TEXT,
                                  password TEXT) WITHOUT ROWID;
        CREATE TABLE numbers (number TEXT PRIMARY KEY, profile_id TEXT, extension TEXT) WITHOUT ROWID;
        CREATE TABLE rates (prefix TEXT PRIMARY KEY, rate INT, connect_fee INT, min_seconds INT,
                            increment_seconds INT) WITHOUT ROWID;
    """)
    db.execute("BEGIN")
    db.executemany("INSERT INTO profiles VALUES (?,?,?,?,0)",
                   [(p.id, p.account_id, p.name, p.channels) for p in profiles])
    db.executemany("INSERT INTO credentials VALUES (?,?,?,?,?)",
                   [(p.sip_username, p.id, "0" * 32, "0" * 64, "x" * 16) for p in profiles])
    db.executemany("INSERT INTO numbers VALUES (?,?,NULL)", [(n.number, n.profile_id) for n in numbers])
    db.executemany("INSERT INTO rates VALUES (?,?,0,60,6)", [(r.prefix, r.rate) for r in rates])
    db.execute("COMMIT")
    return db


def sqlite_lookups(db: sqlite3.Connection, max_len: int):
    cred_q = "SELECT profile_id, ha1_md5, ha1_sha256, password FROM credentials WHERE username=?"
    num_q = ("SELECT p.id, p.account_id, p.name, p.channels, p.balance, n.extension FROM numbers n "
             "JOIN profiles p ON p.id = n.profile_id WHERE n.number=?")
    rate_q = ("SELECT prefix, rate, connect_fee, min_seconds, increment_seconds FROM rates WHERE prefix IN ("
              + ",".join("?" * max_len) + ") ORDER BY length(prefix) DESC LIMIT 1")

    def credential(u: str):
        return db.execute(cred_q, (u,)).fetchone()

    def profile_by_number(n: str):
        return db.execute(num_q, (n,)).fetchone()

    def rate_for(n: str):
        d = n.lstrip("+")
        return db.execute(rate_q, [d[:i] for i in range(1, max_len + 1)]).fetchone()

    return credential, profile_by_number, rate_for


def time_each(fn, keys: list[str]) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for k in keys:
        t0 = clock()
        fn(k)
        out.append(clock() - t0)
    return out


def pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=200_000, help="lookups per kind per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    profiles, numbers, rates = build_dataset()
    rng = random.Random(11)
    users = [rng.choice(profiles).sip_username for _ in range(args.lookups)]
    nums = [rng.choice(numbers).number for _ in range(args.lookups)]
    # destinations: numbers under random prefixes of the table, padded to full length
    dests = ["+" + (r.prefix + "".join(rng.choice("0123456789") for _ in range(12)))[:12]
             for r in (rng.choice(rates) for _ in range(args.lookups))]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = populate_lmdb(str(Path(tmp) / "lmdb"), profiles, numbers, rates)
        lmdb_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        db = populate_sqlite(str(Path(tmp) / "peer.sqlite"), profiles, numbers, rates)
        sqlite_load = time.perf_counter() - t0
        s_cred, s_num, s_rate = sqlite_lookups(db, max(len(r.prefix) for r in rates))
        impls = {
            "lmdb": {"credential": partial(credential, store), "profile_by_number": partial(profile_by_number, store),
                     "rate": partial(rate_for, store)},
            "sqlite": {"credential": s_cred, "profile_by_number": s_num, "rate": s_rate},
        }
        keys = {"credential": users, "profile_by_number": nums, "rate": dests}
        # correctness first: both answer every lookup, and the same prefix
        for u, n, d in zip(users[:2000], nums[:2000], dests[:2000], strict=True):
            assert credential(store, u) is not None and profile_by_number(store, n) is not None
            assert rate_for(store, d).prefix == s_rate(d)[0]
        overhead = statistics.median(time_each(lambda k: None, users[:50_000]))
        runs: dict[str, dict[str, list[dict[str, float]]]] = {i: {k: [] for k in keys} for i in impls}
        for _ in range(args.rounds):  # alternate A and B, per lookup kind
            for kind in keys:
                for impl in impls:
                    samples = time_each(impls[impl][kind], keys[kind])
                    runs[impl][kind].append({"p50_ns": pct(samples, 0.5), "p99_ns": pct(samples, 0.99),
                                             "mean_ns": statistics.fmean(samples)})
        store.close()
        db.close()

    result: dict[str, object] = {"bench": "store_lookups", "sizes": {"profiles": PROFILES, "numbers": NUMBERS,
                                 "prefixes": PREFIXES}, "lookups_per_round": args.lookups, "rounds": args.rounds,
                                 "timer_overhead_ns": overhead,
                                 "load_seconds": {"lmdb": lmdb_load, "sqlite": sqlite_load},
                                 "results": {}, **machine_info()}
    print(f"{'lookup':<18} {'impl':<7} {'p50 µs':>8} {'p99 µs':>8}  (median of {args.rounds} rounds; spread p99)")
    for kind in keys:
        entry: dict[str, object] = {}
        for impl in impls:
            p50 = statistics.median(r["p50_ns"] for r in runs[impl][kind])
            p99s = [r["p99_ns"] for r in runs[impl][kind]]
            p99 = statistics.median(p99s)
            entry[impl] = {"p50_us": p50 / 1000, "p99_us": p99 / 1000,
                           "p99_spread_us": [min(p99s) / 1000, max(p99s) / 1000]}
            print(f"{kind:<18} {impl:<7} {p50 / 1000:8.2f} {p99 / 1000:8.2f}  "
                  f"[{min(p99s) / 1000:.2f}..{max(p99s) / 1000:.2f}]")
        entry["p99_ratio_sqlite_over_lmdb"] = entry["sqlite"]["p99_us"] / entry["lmdb"]["p99_us"]
        print(f"{'':<18} sqlite/lmdb p99 ratio: {entry['p99_ratio_sqlite_over_lmdb']:.1f}x")
        result["results"][kind] = entry
    path = write_result("store.json", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
