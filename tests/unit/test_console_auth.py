"""Console sign-in state (edge/control/console_auth.py): passwords, sessions, lockout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.control import accounts, console_auth
from edge.control.errors import SignInLocked, Unauthorized, WeakPassword
from edge.control.store import Store

PW = "a long enough passphrase"


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path, map_size=16 << 20, durable=False)
    yield s
    s.close()


def test_password_rules_and_sign_in(store: Store) -> None:
    acct = accounts.create(store, "Acme", "acme.admin")
    for bad in ("short", "ACME.ADMIN  ", "x" * 257):
        with pytest.raises(WeakPassword):
            console_auth.set_admin_password(store, acct.id, bad)
    with pytest.raises(Unauthorized):           # no password set yet
        console_auth.sign_in_password(store, "acme.admin", PW)
    console_auth.set_admin_password(store, acct.id, PW)
    token, session = console_auth.sign_in_password(store, "acme.admin", PW)
    assert session.account_id == acct.id and console_auth.session_of(store, token) is not None
    raw = store.read(lambda txn: [bytes(v) for _, v in txn.scan("console_passwords")])
    assert PW.encode() not in b"".join(raw)     # only the scrypt digest is stored
    console_auth.set_admin_password(store, acct.id, PW + "!")   # a new password ends the sessions
    assert console_auth.session_of(store, token) is None


def test_session_expiry_and_sign_out(store: Store) -> None:
    acct = accounts.create(store, "Acme", "acme.admin")
    console_auth.set_admin_password(store, acct.id, PW)
    token, _ = console_auth.sign_in_password(store, "acme.admin", PW, now=1000.0)
    assert console_auth.session_of(store, token, now=1000.0 + console_auth.SESSION_IDLE - 1) is not None
    assert console_auth.session_of(store, token, now=1000.0 + console_auth.SESSION_MAX + 1) is None
    token2, _ = console_auth.sign_in_password(store, "acme.admin", PW)
    console_auth.end_session(store, token2)
    assert console_auth.session_of(store, token2) is None
    assert console_auth.session_of(store, "not a token") is None


def test_lockout_and_unknown_logins_leave_no_record(store: Store) -> None:
    acct = accounts.create(store, "Acme", "acme.admin")
    console_auth.set_admin_password(store, acct.id, PW)
    for i in range(console_auth.MAX_FAILURES - 1):
        with pytest.raises(Unauthorized):
            console_auth.sign_in_password(store, "acme.admin", f"wrong {i}", now=100.0 + i)
    with pytest.raises(SignInLocked):           # the 5th failure locks
        console_auth.sign_in_password(store, "acme.admin", "wrong again", now=110.0)
    with pytest.raises(SignInLocked):           # the right password too, while locked
        console_auth.sign_in_password(store, "acme.admin", PW, now=111.0)
    token, _ = console_auth.sign_in_password(store, "acme.admin", PW, now=110.0 + console_auth.LOCKOUT_SECONDS + 1)
    assert token
    for i in range(20):
        with pytest.raises(Unauthorized):
            console_auth.sign_in_password(store, f"nobody{i}", PW)
    assert store.read(lambda txn: txn.entries("console_signins")) <= 1
