"""The demo tenant that ``make run`` provisions on an empty store (SPEC §2)."""

from __future__ import annotations

import msgspec

from . import accounts, ledger, numbers, profiles, rates
from .models import AutoRecharge
from .money import parse_money
from .store import Store
from .tables import shipped_exclusions, shipped_rates

DEMO_NUMBER = "+14155550100"
ECHO_NUMBER = "+17606604690"
META_KEY = b"demo_profile"


class DemoInfo(msgspec.Struct):
    account_id: str
    profile_id: str
    sip_username: str
    sip_password: str
    number: str
    created: bool


def ensure_demo(store: Store, *, realm: str) -> DemoInfo:
    """Provision the demo on an empty store; on a store that has it, return it again.

    :param realm: the SIP domain (the demo credential's HA1s are computed for it).
    """
    marker = store.read(lambda txn: txn.get_raw("meta", META_KEY))
    if marker is not None:
        profile_id = marker.decode()
        cred = profiles.credential_of(store, profile_id)
        prof = profiles.get(store, profile_id)
        return DemoInfo(prof.account_id, prof.id, cred.username, cred.password,
                        prof.numbers[0] if prof.numbers else "", created=False)
    if not accounts.is_empty(store) or rates.count(store):
        raise RuntimeError("the store holds data but no demo: not provisioning a demo into it")
    rates.replace(store, shipped_rates())
    rates.ensure_exclusions(store, shipped_exclusions())
    acct = accounts.create(store, "Demo Business", "demo.admin")
    ledger.top_up(store, acct.id, parse_money("100.00"), ref="demo")
    prof, cred = profiles.create(store, acct.id, "Demo PBX", channels=10, auth="digest", realm=realm)
    ledger.allocate(store, prof.id, parse_money("20.00"), ref="demo")
    ledger.set_auto_recharge(store, prof.id, AutoRecharge(enabled=True, amount=parse_money("10.00"),
                                                          min_balance=parse_money("2.00")))
    numbers.buy(store, acct.id, DEMO_NUMBER)
    numbers.attach(store, prof.id, DEMO_NUMBER)
    store.write(lambda txn: txn.put_raw("meta", META_KEY, prof.id.encode()))
    return DemoInfo(acct.id, prof.id, cred.username, cred.password, DEMO_NUMBER, created=True)
