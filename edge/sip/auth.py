"""Digest authentication (RFC 3261 §22, RFC 7616 algorithms, RFC 8760 for SIP).

Challenges offer SHA-256 first and MD5 second, both with ``qop=auth``. Nonces are
stateless: a timestamp and random bytes signed with a per-process HMAC key, so any
nonce we issued can be checked (and found stale) without storing it. What is stored
is the highest nonce-count seen per nonce, so a replayed ``nc`` is refused; the
table is pruned as nonces expire.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edge.control.models import Credential

from . import digest_params
from .request import token_hex

ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


class AuthResult(enum.Enum):
    OK = "ok"
    MISSING = "missing"            # no credentials: challenge
    STALE = "stale"                # our nonce, expired: challenge with stale=true
    BAD_NONCE = "bad_nonce"        # not a nonce we issued: challenge
    REPLAY = "nonce_count_replay"  # nc not above the last one seen: refuse
    UNKNOWN_USER = "unknown_user"
    USER_MISMATCH = "username_mismatch"
    BAD_PASSWORD = "bad_password"
    UNSUPPORTED = "unsupported"    # algorithm or qop we do not accept: challenge


@dataclass(slots=True)
class DigestAnswer:
    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str
    qop: str | None
    nc: str | None
    cnonce: str | None


def parse_authorization(value: str) -> DigestAnswer | None:
    """Parse ``Digest username="..", ...``; None if it is not a usable Digest answer."""
    params = digest_params(value)  # the compiled scanner (_sipparse.pyx); parser_py has its oracle
    if params is None:
        return None
    try:
        return DigestAnswer(
            username=params["username"], realm=params["realm"], nonce=params["nonce"], uri=params["uri"],
            response=params["response"].lower(), algorithm=params.get("algorithm", "MD5").upper(),
            qop=params.get("qop"), nc=params.get("nc"), cnonce=params.get("cnonce"),
        )
    except KeyError:
        return None


class DigestAuth:
    """Issues challenges and checks answers for one realm.

    :param nonce_ttl: seconds a nonce stays fresh; older ones are answered ``stale=true``.
    """

    def __init__(self, realm: str, nonce_ttl: float = 300.0, key: bytes | None = None,
                 algorithms: Sequence[str] = ("SHA-256", "MD5")) -> None:
        self.realm = realm
        self.algorithms = tuple(algorithms)
        self.nonce_ttl = nonce_ttl
        self._key = key or os.urandom(32)
        self._nc: dict[str, tuple[int, float]] = {}   # nonce -> (highest nc, issued at)
        self._last_prune = time.monotonic()

    # ------------------------------------------------------------- nonces

    def _mac(self, stamp: str) -> str:
        """The nonce's signature: keyed BLAKE2b (a MAC by design, RFC 7693 §2.9), 12 bytes as hex;
        one C call, where HMAC-SHA256 costs two hash passes and an object."""
        return hashlib.blake2b(stamp.encode(), key=self._key, digest_size=12).hexdigest()

    def new_nonce(self, now: float | None = None) -> str:
        stamp = f"{int((now or time.time()) * 1000):012x}{token_hex(8)}"
        return stamp + self._mac(stamp)

    def _nonce_time(self, nonce: str) -> float | None:
        """When we issued ``nonce``, or None if we did not issue it."""
        if len(nonce) != 52:
            return None
        stamp, mac = nonce[:28], nonce[28:]
        expected = self._mac(stamp)
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            return int(stamp[:12], 16) / 1000.0
        except ValueError:
            return None

    def challenge(self, *, proxy: bool, stale: bool = False) -> list[tuple[str, str]]:
        """WWW-Authenticate (401) or Proxy-Authenticate (407) headers: SHA-256 then MD5 (RFC 8760 §2.4)."""
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        nonce = self.new_nonce()
        extra = ", stale=true" if stale else ""
        return [(name, f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, qop="auth"{extra}')
                for alg in self.algorithms]

    # ------------------------------------------------------------- answers

    def verify(self, answer: DigestAnswer | None, method: str, cred: Credential | None,
               expected_user: str | None = None, now: float | None = None) -> AuthResult:
        """Check a Digest answer against the stored HA1.

        :param expected_user: the SIP username the request claims (To for REGISTER,
            From for INVITE); the digest username must be it.
        """
        if answer is None:
            return AuthResult.MISSING
        if answer.algorithm not in self.algorithms or answer.qop != "auth" or not answer.nc or not answer.cnonce:
            return AuthResult.UNSUPPORTED
        issued = self._nonce_time(answer.nonce)
        if issued is None or answer.realm != self.realm:
            return AuthResult.BAD_NONCE
        now = time.time() if now is None else now
        if now - issued > self.nonce_ttl:
            return AuthResult.STALE
        if cred is None:
            return AuthResult.UNKNOWN_USER
        if answer.username != cred.username or (expected_user is not None and expected_user != cred.username):
            return AuthResult.USER_MISMATCH
        try:
            nc = int(answer.nc, 16)
        except ValueError:
            return AuthResult.UNSUPPORTED
        h = ALGORITHMS[answer.algorithm]
        ha1 = cred.ha1_sha256 if answer.algorithm == "SHA-256" else cred.ha1_md5
        if cred.realm != self.realm:  # realm changed since the credential was made
            ha1 = h(f"{cred.username}:{self.realm}:{cred.password}".encode()).hexdigest()
        ha2 = h(f"{method}:{answer.uri}".encode()).hexdigest()
        expected = h(f"{ha1}:{answer.nonce}:{answer.nc}:{answer.cnonce}:auth:{ha2}".encode()).hexdigest()
        if not hmac.compare_digest(expected, answer.response):
            return AuthResult.BAD_PASSWORD
        last, _ = self._nc.get(answer.nonce, (0, issued))
        if nc <= last:
            return AuthResult.REPLAY
        self._nc[answer.nonce] = (nc, issued)
        self._prune(now)
        return AuthResult.OK

    def _prune(self, now: float) -> None:
        mono = time.monotonic()
        if mono - self._last_prune < 10:
            return
        self._last_prune = mono
        horizon = now - self.nonce_ttl
        for nonce in [n for n, (_, t) in self._nc.items() if t < horizon]:
            del self._nc[nonce]


def source_allowed(host: str, allowed: list[str]) -> bool:
    """Is ``host`` inside one of the profile's allowed addresses/CIDRs (IP authentication)?"""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    for net in allowed:
        try:
            if addr in ipaddress.ip_network(net, strict=False):
                return True
        except ValueError:
            continue
    return False


class FailureTracker:
    """Temporary blocking of a source after repeated authentication failures (SPEC §7).

    :param threshold: failures within ``window`` seconds that block the source.
    :param block_seconds: how long a blocked source is ignored.
    :param max_sources: sources remembered at most, failing and blocked each (like
        ``RateLimiter``): a scan from 200,000 addresses must not grow memory without
        end. Past the bound the source that failed least recently is forgotten (a
        source that keeps failing stays), and the block that ends first is lifted.
    """

    def __init__(self, threshold: int = 20, window: float = 60.0, block_seconds: float = 120.0,
                 max_sources: int = 100_000) -> None:
        self.threshold = threshold
        self.window = window
        self.block_seconds = block_seconds
        self.max_sources = max_sources
        self._fails: dict[str, list[float]] = {}   # least recently failing first
        self._blocked: dict[str, float] = {}       # block ends, earliest first

    def blocked(self, host: str, now: float | None = None) -> bool:
        until = self._blocked.get(host)
        if until is None:
            return False
        if (now or time.monotonic()) >= until:
            del self._blocked[host]
            return False
        return True

    def failure(self, host: str, now: float | None = None) -> bool:
        """Record a failure; True if the source is now blocked."""
        now = now or time.monotonic()
        times = [t for t in self._fails.pop(host, ()) if now - t < self.window]  # re-inserted last
        times.append(now)
        if len(times) >= self.threshold:
            self._blocked.pop(host, None)
            if len(self._blocked) >= self.max_sources:
                del self._blocked[next(iter(self._blocked))]  # every block lasts as long: the oldest ends first
            self._blocked[host] = now + self.block_seconds
            return True
        if len(self._fails) >= self.max_sources:
            del self._fails[next(iter(self._fails))]
        self._fails[host] = times
        return False

    def success(self, host: str) -> None:
        self._fails.pop(host, None)

    @property
    def blocked_count(self) -> int:
        now = time.monotonic()
        return sum(1 for until in self._blocked.values() if until > now)
