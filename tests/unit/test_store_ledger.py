"""Money in the store: a hypothesis state machine drives random movements, and after every
step the balances equal both a reference model and the sum of their ledger entries."""

from __future__ import annotations

import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from edge.control import accounts, ledger, profiles
from edge.control.errors import Conflict, InsufficientFunds, Invalid
from edge.control.models import AutoRecharge
from edge.control.money import MoneyError, format_money, parse_money
from edge.control.store import Store, Txn

amounts = st.integers(min_value=1, max_value=50_000_000)


class LedgerMachine(RuleBasedStateMachine):
    accounts = Bundle("accounts")
    profiles = Bundle("profiles")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = Store(self.dir.name, map_size=64 << 20, durable=False)
        self.model: dict[str, int] = {}          # owner -> expected balance
        self.profile_account: dict[str, str] = {}
        self.auto: dict[str, AutoRecharge] = {}

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    def _recharge(self, profile_id: str) -> None:
        ar = self.auto.get(profile_id)
        acct = "account:" + self.profile_account[profile_id]
        prof = "profile:" + profile_id
        if ar and ar.enabled and self.model[prof] < ar.min_balance and self.model[acct] >= ar.amount:
            self.model[acct] -= ar.amount
            self.model[prof] += ar.amount

    @rule(target=accounts, n=st.integers(0, 10**6))
    def create_account(self, n: int) -> str:
        acct = accounts.create(self.store, "A", f"admin{n}.{len(self.model)}")
        self.model["account:" + acct.id] = 0
        return acct.id

    @rule(account=accounts, amount=amounts)
    def top_up(self, account: str, amount: int) -> None:
        ledger.top_up(self.store, account, amount)
        self.model["account:" + account] += amount

    @rule(target=profiles, account=accounts, channels=st.integers(1, 300))
    def create_profile(self, account: str, channels: int) -> str:
        prof, _ = profiles.create(self.store, account, "P", channels, realm="sip.edge.test")
        self.model["profile:" + prof.id] = 0
        self.profile_account[prof.id] = account
        return prof.id

    @rule(profile=profiles, amount=amounts)
    def allocate(self, profile: str, amount: int) -> None:
        acct = "account:" + self.profile_account[profile]
        if self.model[acct] >= amount:
            ledger.allocate(self.store, profile, amount)
            self.model[acct] -= amount
            self.model["profile:" + profile] += amount
        else:
            with pytest.raises(InsufficientFunds):
                ledger.allocate(self.store, profile, amount)

    @rule(profile=profiles, enabled=st.booleans(), amount=amounts, min_balance=amounts)
    def auto_recharge(self, profile: str, enabled: bool, amount: int, min_balance: int) -> None:
        settings_ = AutoRecharge(enabled=enabled, amount=amount, min_balance=min_balance)
        ledger.set_auto_recharge(self.store, profile, settings_)
        self.auto[profile] = settings_
        self._recharge(profile)

    @rule(profile=profiles, amount=amounts)
    def spend(self, profile: str, amount: int) -> None:
        """A debit as a call settlement makes one, with auto-recharge right after it."""
        key = "profile:" + profile

        def op(txn: Txn) -> None:
            prof = profiles.get(txn, profile)
            ledger.move(txn, prof, -amount, "call", "test")
            ledger.auto_recharge(txn, prof)

        if self.model[key] >= amount:
            self.store.write(op)
            self.model[key] -= amount
            self._recharge(profile)
        else:
            with pytest.raises(InsufficientFunds):
                self.store.write(op)

    @rule(profile=consumes(profiles))
    def delete_profile(self, profile: str) -> None:
        key = "profile:" + profile
        profiles.delete(self.store, profile)
        self.model["account:" + self.profile_account[profile]] += self.model.pop(key)
        self.model[key] = 0  # its ledger is closed at zero

    @rule(profile=profiles, bundles=st.integers(0, 300))
    def bundles(self, profile: str, bundles: int) -> None:
        channels = profiles.get(self.store, profile).channels
        if bundles > channels:
            with pytest.raises(Conflict):
                profiles.set_bundles(self.store, profile, bundles)
        else:
            assert profiles.set_bundles(self.store, profile, bundles).us_bundles == bundles

    @invariant()
    def balances_equal_model_and_ledger(self) -> None:
        audit = ledger.audit(self.store)
        for owner, expected in self.model.items():
            stored, ledger_sum = audit.get(owner, (0, 0))
            assert stored == expected == ledger_sum, owner

    @precondition(lambda self: bool(self.model))
    @invariant()
    def money_is_conserved(self) -> None:
        """Only top-ups create money: everything else moves it between owners."""
        topups = sum(e.amount for owner in self.model if owner.startswith("account:")
                     for e in ledger.entries(self.store, owner, limit=10**6) if e.kind == "topup")
        spent = sum(-e.amount for owner in self.model if owner.startswith("profile:")
                    for e in ledger.entries(self.store, owner, limit=10**6) if e.kind == "call")
        assert sum(self.model.values()) == topups - spent


LedgerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedger = LedgerMachine.TestCase


@pytest.mark.parametrize("text, micros", [
    ("0", 0), ("1", 1_000_000), ("0.000001", 1), ("100.00", 100_000_000), ("12.345678", 12_345_678),
])
def test_parse_money(text: str, micros: int) -> None:
    assert parse_money(text) == micros
    assert parse_money(format_money(micros)) == micros


@pytest.mark.parametrize("text", ["-1", "1.0000001", "1e3", ".5", "5.", "", "1 ", "NaN", "1,5"])
def test_parse_money_refuses(text: str) -> None:
    with pytest.raises(MoneyError):
        parse_money(text)


def test_format_money() -> None:
    assert format_money(0) == "0.00"
    assert format_money(5_000_000) == "5.00"
    assert format_money(20_000) == "0.02"
    assert format_money(-1) == "-0.000001"


def test_zero_movement_is_refused(tmp_path) -> None:
    store = Store(tmp_path, map_size=16 << 20)
    acct = accounts.create(store, "A", "a")
    with pytest.raises(Invalid):
        ledger.top_up(store, acct.id, 0)
    assert ledger.entries(store, f"account:{acct.id}") == []
    store.close()
