"""SIP profiles and their credentials (SPEC §3): channels, auth mode, US bundles, password.

A profile's credential is keyed by its SIP username so that the registrar and the INVITE
challenge need one ``get`` (:func:`credential`). Both digest HA1s are precomputed for the
realm the credential was made for. Balances change only through
:mod:`edge.control.ledger`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import string
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from . import accounts
from .errors import BundlesExceedChannels, ChannelsOutOfRange, Invalid, NotFound, ProfileHasLiveCalls
from .models import Credential, Profile
from .store import Store, Txn, new_id, reads, writes

SIP_USERNAME_BASE = 990500000000
MAX_CHANNELS = 300
_PASSWORD_ALPHABET = string.ascii_letters + string.digits
_credential = msgspec.msgpack.Decoder(Credential)   # the call path's own decoder


def digest_ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """HA1 of RFC 2617 (MD5) / RFC 7616 (SHA-256): H(username:realm:password)."""
    h = hashlib.sha256 if algorithm.upper().startswith("SHA-256") else hashlib.md5
    return h(f"{username}:{realm}:{password}".encode()).hexdigest()


def new_password() -> str:
    """16 random letters and digits."""
    # starts with a letter: some UAs (SIPp) read a password beginning "0x" as hex
    return secrets.choice(string.ascii_letters) + "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(15))


def make_credential(prof: Profile, password: str, realm: str) -> Credential:
    """The credential record of ``prof`` for ``password`` in ``realm`` (both HA1s computed)."""
    return Credential(
        profile_id=prof.id, username=prof.sip_username, password=password, realm=realm,
        ha1_md5=digest_ha1(prof.sip_username, realm, password, "MD5"),
        ha1_sha256=digest_ha1(prof.sip_username, realm, password, "SHA-256"),
        auth=prof.auth, allowed_ips=list(prof.allowed_ips),
    )


# ------------------------------------------------------------------- reads

@reads
def get(txn: Txn, profile_id: str) -> Profile:
    """:raises NotFound: no such profile."""
    prof = txn.get("profiles", profile_id.encode(), Profile)
    if prof is None:
        raise NotFound(f"profile {profile_id} not found")
    return prof


@reads
def find(txn: Txn, profile_id: str) -> Profile | None:
    """The profile, or None if it does not exist (any more)."""
    return txn.get("profiles", profile_id.encode(), Profile)


@reads
def page(txn: Txn, *, after: str = "", limit: int = 100) -> list[Profile]:
    """Profiles in id order, those after ``after`` (a page cursor), at most ``limit``."""
    return txn.page_after_key("profiles", Profile, after, limit)


@reads
def of_account(txn: Txn, account_id: str | None = None) -> list[Profile]:
    """Every profile of ``account_id`` (of every account if None)."""
    return [p for p in txn.values("profiles", Profile) if account_id is None or p.account_id == account_id]


@reads
def credential_of(txn: Txn, profile_id: str) -> Credential:
    """The credential (with the password) of a profile.

    :raises NotFound: no such profile, or it has no credential.
    """
    prof = get(txn, profile_id)
    cred = txn.get("credentials", prof.sip_username.encode(), Credential)
    if cred is None:
        raise NotFound(f"profile {profile_id} has no credential")
    return cred


def credential(store: Store, username: str) -> Credential | None:
    """Call path: the credential of a SIP username (registrar, INVITE challenge), one ``get``."""
    with store.env.begin(db=store.dbs.credentials) as txn:
        raw = txn.get(username.encode())
    return None if raw is None else _credential.decode(raw)


# ------------------------------------------------------------------ writes

def save(txn: Txn, prof: Profile) -> None:
    """Store ``prof`` as it is (the other domain modules update their parts of it)."""
    txn.put("profiles", prof.id.encode(), prof)


@writes()
def create(
    txn: Txn,
    account_id: str,
    name: str,
    channels: int,
    auth: str = "digest",
    allowed_ips: Iterable[str] = (),
    static_contact: str | None = None,
    *,
    realm: str,
    password: str | None = None,
) -> tuple[Profile, Credential]:
    """A new profile of ``account_id`` with a generated SIP username and password (or ``password``).

    :param realm: the SIP domain the credential's HA1s are computed for.
    :raises Invalid: channels out of 1..300, bad auth settings.
    :raises NotFound: no such account.
    """
    check_channels(channels)
    allowed = list(allowed_ips)
    check_auth(auth, allowed, static_contact)
    accounts.get(txn, account_id)
    username = str(SIP_USERNAME_BASE + txn.next_counter(b"sip_username_seq"))
    prof = Profile(
        id=new_id("prf"), account_id=account_id, name=name, channels=channels, auth=auth,  # type: ignore[arg-type]
        sip_username=username, allowed_ips=allowed, static_contact=static_contact, created_at=time.time(),
    )
    cred = make_credential(prof, password or new_password(), realm)
    save(txn, prof)
    txn.put("credentials", username.encode(), cred)
    return prof, cred


@writes()
def update(txn: Txn, profile_id: str, changes: dict[str, Any]) -> Profile:
    """Apply a PATCH: ``name``, ``channels``, ``auth``, ``allowed_ips``, ``static_contact``.

    :raises Conflict: channels below the profile's US bundles.
    """
    prof = get(txn, profile_id)
    if "channels" in changes:
        check_channels(changes["channels"])
        if changes["channels"] < prof.us_bundles:
            raise BundlesExceedChannels(
                f"profile has {prof.us_bundles} US bundles; channels cannot go below that "
                "(US bundles never exceed channels)", field="channels",
            )
    for name, value in changes.items():
        setattr(prof, name, value)
    check_auth(prof.auth, prof.allowed_ips, prof.static_contact)
    save(txn, prof)
    cred = txn.get("credentials", prof.sip_username.encode(), Credential)
    if cred is not None:
        cred.auth, cred.allowed_ips = prof.auth, list(prof.allowed_ips)
        txn.put("credentials", prof.sip_username.encode(), cred)
    return prof


@writes()
def rotate_password(txn: Txn, profile_id: str, *, realm: str | None = None) -> Credential:
    """A new SIP password for the profile (both HA1s recomputed): the old one stops working at
    the next challenge. :returns: the new credential."""
    prof = get(txn, profile_id)
    old = txn.get("credentials", prof.sip_username.encode(), Credential)
    cred = make_credential(prof, new_password(), realm or (old.realm if old is not None else "sip.edge.test"))
    txn.put("credentials", prof.sip_username.encode(), cred)
    return cred


@writes()
def set_bundles(txn: Txn, profile_id: str, us_bundles: int) -> Profile:
    """:raises Conflict: more bundles than channels."""
    prof = get(txn, profile_id)
    if us_bundles > prof.channels:
        raise BundlesExceedChannels(f"{us_bundles} US bundles exceed the profile's {prof.channels} channels",
                                    field="us_bundles")
    prof.us_bundles = us_bundles
    save(txn, prof)
    return prof


@reads
def refuse_with_live_calls(txn: Txn, prof: Profile) -> None:
    """:raises ProfileHasLiveCalls: the profile has live calls (on a cluster node: here or on any node
    it knows of)."""
    from . import channels

    if channels.in_use(txn, prof.id) or channels.elsewhere(txn, prof.id):
        raise ProfileHasLiveCalls("profile has live calls; end them first")


@writes(grows=False)
def delete(txn: Txn, profile_id: str) -> None:
    """Delete a profile with no live calls: its credit returns to the account, numbers and
    business accounts are detached, its credential and registrations go.

    :raises Conflict: the profile has live calls (on a cluster node: here or on any node it knows of).
    """
    # These modules build on this one (they read profiles): imported here, not at the top.
    from . import ledger, numbers, registrations

    prof = get(txn, profile_id)
    refuse_with_live_calls(txn, prof)
    ledger.close_profile(txn, prof)
    numbers.detach_all(txn, prof)
    registrations.remove_all(txn, prof.id)
    txn.delete("credentials", prof.sip_username.encode())
    txn.delete("profiles", prof.id.encode())


# -------------------------------------------------------------- validation

def check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise ChannelsOutOfRange(f"channels must be between 1 and {MAX_CHANNELS}, got {channels}", field="channels")


def check_auth(auth: str, allowed_ips: list[str], static_contact: str | None) -> None:
    if auth not in ("digest", "ip"):
        raise Invalid(f"auth must be 'digest' or 'ip', got {auth!r}", field="auth")
    for i, net in enumerate(allowed_ips):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise Invalid(f"not an address or CIDR: {net!r}", field=f"allowed_ips[{i}]") from None
    if auth == "ip":
        if not allowed_ips:
            raise Invalid("an ip profile needs at least one allowed address", field="allowed_ips")
        if not static_contact:
            raise Invalid("an ip profile needs a static_contact for incoming calls", field="static_contact")
    if static_contact is not None and not static_contact.startswith(("sip:", "sips:")):
        raise Invalid(f"static_contact must be a sip: URI, got {static_contact!r}", field="static_contact")
