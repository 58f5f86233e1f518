"""Call-path lookups of the store and the shipped prefix tables."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge.control import accounts, numbers, profiles, rates, registrations
from edge.control.demo import ensure_demo
from edge.control.errors import Invalid
from edge.control.models import Rate, Registration
from edge.control.profiles import digest_ha1
from edge.control.rates import is_bundle_excluded, rate_for
from edge.control.store import Store
from edge.control.tables import parse_exclusions, parse_rates_csv, shipped_exclusions, shipped_rates

SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "skype-connect-quick-start.txt"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path, map_size=64 << 20, durable=False)
    yield s
    s.close()


def test_longest_prefix_wins(store: Store) -> None:
    rates.replace(store, [Rate(prefix=p, rate=i + 1) for i, p in enumerate(["4", "44", "4420", "44207", "1"])])
    assert rate_for(store, "+442071234567").prefix == "44207"
    assert rate_for(store, "442081234567").prefix == "4420"
    assert rate_for(store, "+441611234567").prefix == "44"
    assert rate_for(store, "+491234").prefix == "4"
    assert rate_for(store, "+81312345678") is None
    assert rate_for(store, "+4") .prefix == "4"
    rates.replace(store, [Rate(prefix="81", rate=1)])  # replacing drops the old table entirely
    assert rate_for(store, "+442071234567") is None
    assert rate_for(store, "+81312345678").prefix == "81"


def test_duplicate_prefix_rejected_and_table_kept(store: Store) -> None:
    rates.replace(store, [Rate(prefix="44", rate=1)])
    with pytest.raises(Invalid):
        rates.replace(store, [Rate(prefix="33", rate=1), Rate(prefix="33", rate=2)])
    assert rate_for(store, "+4420").prefix == "44"
    assert rate_for(store, "+3312") is None


def test_a_chunked_load_switches_tables_at_its_end_only(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """rates.load writes the other half of the double buffer chunk by chunk: calls rated
    between two chunks still see the old table, never a mix."""
    rates.replace(store, [Rate(prefix="44", rate=1)])
    seen: list[tuple[str | None, str | None]] = []
    write = store.write

    def spying(fn, **kw):   # between chunks: what a call would be rated at
        seen.append(((rate_for(store, "+4420") or Rate(prefix="-", rate=0)).prefix,
                     (rate_for(store, "+3312") or Rate(prefix="-", rate=0)).prefix))
        return write(fn, **kw)

    monkeypatch.setattr(store, "write", spying)
    new = [Rate(prefix=f"3{i}", rate=i + 1) for i in range(10)]
    assert rates.load(store, new, chunk=3) == 10
    monkeypatch.undo()
    assert len(seen) == 1 + 4 + 1 and set(seen) == {("44", "-")}   # begin, 4 chunks, switch: the old table
    assert rate_for(store, "+3312").prefix == "33" and rate_for(store, "+4420") is None
    assert rates.count(store) == 10
    assert rates.load(store, [Rate(prefix="44", rate=2)], chunk=3) == 1   # and back to the first half
    assert rate_for(store, "+4420").rate == 2 and rate_for(store, "+3312") is None and rates.count(store) == 1


def test_a_chunked_load_with_a_duplicate_keeps_the_table(store: Store) -> None:
    rates.replace(store, [Rate(prefix="44", rate=1)])
    with pytest.raises(Invalid, match="appears twice"):
        rates.load(store, [Rate(prefix="33", rate=1), *(Rate(prefix=f"7{i}", rate=1) for i in range(5)),
                           Rate(prefix="33", rate=2)], chunk=2)
    assert rate_for(store, "+4420").prefix == "44" and rate_for(store, "+3312") is None


def test_a_load_overtaken_by_another_is_abandoned(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rates.replace(store, [Rate(prefix="44", rate=1)])
    write, calls = store.write, []

    def overtaken(fn, **kw):
        calls.append(fn)
        if len(calls) == 2:   # after the load began: another replaces the table
            write(lambda txn: rates.replace(txn, [Rate(prefix="81", rate=1)]))
        return write(fn, **kw)

    monkeypatch.setattr(store, "write", overtaken)
    with pytest.raises(Invalid, match="another rate table load"):
        rates.load(store, [Rate(prefix="33", rate=1)] * 1 + [Rate(prefix="34", rate=1)], chunk=1)
    monkeypatch.undo()
    assert rate_for(store, "+8131").prefix == "81" and rate_for(store, "+3312") is None


def test_exclusions_are_parsed_from_the_seed() -> None:
    shipped = shipped_exclusions()
    assert len(shipped) == 101
    assert "1218632" in shipped and "19512623" in shipped
    assert "17127256" in shipped  # "7127256 xxxx": the stray space of the seed
    if SEED.exists():  # the seed sits beside the checkout in the workplace and in CI
        text = SEED.read_text()
        assert parse_exclusions(text[text.index("* Calls to the following US prefixes"):]) == shipped


def test_bundle_exclusion_lookup(store: Store) -> None:
    rates.replace_exclusions(store, shipped_exclusions())
    assert is_bundle_excluded(store, "+12186321234")
    assert is_bundle_excluded(store, "+17127256123")
    assert is_bundle_excluded(store, "16057154123")
    assert not is_bundle_excluded(store, "+12186331234")
    assert not is_bundle_excluded(store, "+14155550100")


def test_shipped_rates_cover_the_demo() -> None:
    rates = {r.prefix: r for r in shipped_rates()}
    assert rates["1"].rate == 23_000 and rates["44"].min_seconds == 60


def test_rates_csv_errors_name_row_and_column() -> None:
    with pytest.raises(Invalid) as err:
        parse_rates_csv("prefix,rate\n44,0.02\n33,abc\n")
    assert err.value.field == "rates[1].rate"
    with pytest.raises(Invalid):
        parse_rates_csv("prefix,price\n44,0.02\n")


def test_credentials_carry_both_ha1s(store: Store) -> None:
    acct = accounts.create(store, "A", "a.admin")
    prof, cred = profiles.create(store, acct.id, "HQ", 2, password="secret", realm="sip.edge.test")
    got = profiles.credential(store, prof.sip_username)
    assert got == cred
    assert got.ha1_md5 == digest_ha1(prof.sip_username, "sip.edge.test", "secret")
    assert got.ha1_sha256 == digest_ha1(prof.sip_username, "sip.edge.test", "secret", "SHA-256")
    assert len(got.ha1_sha256) == 64
    assert profiles.credential(store, "nobody") is None


def test_profile_by_number(store: Store) -> None:
    acct = accounts.create(store, "A", "a.admin")
    prof, _ = profiles.create(store, acct.id, "HQ", 2, realm="sip.edge.test")
    numbers.buy(store, acct.id, "+14155550100")
    assert numbers.profile_by_number(store, "+14155550100") is None  # bought, not attached
    numbers.attach(store, prof.id, "+14155550100", "sales")
    number, found = numbers.profile_by_number(store, "+14155550100")
    assert found.id == prof.id and number.extension == "sales"
    assert numbers.profile_by_number(store, "+14155550199") is None


def test_expired_bindings_are_never_returned(store: Store) -> None:
    now = time.time()
    registrations.save(store, Registration(profile_id="p1", contact="sip:a@1.2.3.4", expires_at=now + 60))
    registrations.save(store, Registration(profile_id="p1", contact="sip:b@1.2.3.4", expires_at=now - 1))
    registrations.save(store, Registration(profile_id="p10", contact="sip:c@1.2.3.4", expires_at=now + 60))
    assert [r.contact for r in registrations.live(store, "p1", now)] == ["sip:a@1.2.3.4"]
    assert registrations.counts(store, now) == {"p1": 1, "p10": 1}
    assert registrations.purge_expired(store, now) == 1
    assert registrations.remove(store, "p1", "sip:a@1.2.3.4")
    assert registrations.live(store, "p1", now) == []


def test_demo_is_provisioned_once(store: Store) -> None:
    first = ensure_demo(store, realm="sip.edge.test")
    assert first.created
    again = ensure_demo(store, realm="sip.edge.test")
    assert not again.created and again.sip_password == first.sip_password
    prof = profiles.get(store, first.profile_id)
    assert prof.balance == 20_000_000 and prof.numbers == ["+14155550100"]
    assert rate_for(store, "+442071234567").prefix == "4420"
    assert is_bundle_excluded(store, "+12186321234")
