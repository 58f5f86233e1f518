"""The demo tenant that ``make run`` provisions on an empty store (SPEC §2)."""

from __future__ import annotations

import msgspec

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


def ensure_demo(store: Store) -> DemoInfo:
    """Provision the demo on an empty store; on a store that has it, return it again."""
    marker = store.read(lambda txn: txn.get(META_KEY, db=store.db["meta"]))
    if marker is not None:
        profile_id = marker.decode()
        cred = store.credential_for_profile(profile_id)
        prof = store.get_profile(profile_id)
        return DemoInfo(prof.account_id, prof.id, cred.username, cred.password,
                        prof.numbers[0] if prof.numbers else "", created=False)
    if not store.is_empty() or store.rate_count():
        raise RuntimeError("the store holds data but no demo: not provisioning a demo into it")
    store.replace_rates(shipped_rates())
    store.ensure_exclusions(shipped_exclusions())
    acct = store.create_account("Demo Business", "demo.admin")
    store.top_up_account(acct.id, parse_money("100.00"), ref="demo")
    prof, cred = store.create_profile(acct.id, "Demo PBX", channels=10, auth="digest")
    store.allocate_credit(prof.id, parse_money("20.00"), ref="demo")
    store.set_auto_recharge(prof.id, AutoRecharge(enabled=True, amount=parse_money("10.00"),
                                                  min_balance=parse_money("2.00")))
    store.buy_number(acct.id, DEMO_NUMBER)
    store.attach_number(prof.id, DEMO_NUMBER)
    store.write(lambda txn: txn.put(META_KEY, prof.id.encode(), db=store.db["meta"]))
    return DemoInfo(acct.id, prof.id, cred.username, cred.password, DEMO_NUMBER, created=True)
