"""pytest-benchmark of the call-path store lookups (opt-in: SIPEDGE_PERF=1).

    SIPEDGE_PERF=1 .venv/bin/python -m pytest tests/perf/test_store_perf.py --benchmark-only

The side-by-side figures for the README come from ``python -m bench.bench_store``.
"""

from __future__ import annotations

import random

import pytest

from bench.bench_store import build_dataset, populate_lmdb
from edge.control.numbers import profile_by_number
from edge.control.profiles import credential
from edge.control.rates import rate_for

pytestmark = pytest.mark.perf


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    profiles, numbers, rates = build_dataset()
    store = populate_lmdb(str(tmp_path_factory.mktemp("lmdb")), profiles, numbers, rates)
    yield store, profiles, numbers, rates
    store.close()


def test_credential_lookup(benchmark, loaded) -> None:
    store, profiles, _, _ = loaded
    users = iter([random.choice(profiles).sip_username for _ in range(2_000_000)])
    assert benchmark(lambda: credential(store, next(users))) is not None


def test_profile_by_number(benchmark, loaded) -> None:
    store, _, numbers, _ = loaded
    nums = iter([random.choice(numbers).number for _ in range(2_000_000)])
    assert benchmark(lambda: profile_by_number(store, next(nums))) is not None


def test_longest_prefix_rate(benchmark, loaded) -> None:
    store, _, _, rates = loaded
    dests = iter(["+" + (random.choice(rates).prefix + "555123456789")[:12] for _ in range(2_000_000)])
    assert benchmark(lambda: rate_for(store, next(dests))) is not None
