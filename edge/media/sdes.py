"""SDES key negotiation of one call (RFC 4568) under the per-side ``srtp`` modes (SPEC §4.6).

The edge terminates SRTP on each leg: what a party offers or answers in ``a=crypto`` is the
key that party sends with, and the edge writes its own keys toward each party, made here
from ``secrets`` once per leg and suite (re-keyed per leg, never passed through; see
docs/security.md, "SRTP"). A :class:`SdesCall` follows the call's offers and answers and
says, for each SDP that crosses the edge, which SRTP contexts the relay needs on the
sender's leg and what profile and ``a=crypto`` lines the SDP toward the other party gets.

Modes: ``off`` takes plain RTP (an ``RTP/SAVP``-only stream is refused, 488; ``a=crypto``
on ``RTP/AVP``, best-effort SDES, is ignored), ``optional`` takes either and prefers SRTP,
``mandatory`` refuses plain RTP (488) but takes best-effort SDES as SRTP.
"""
from __future__ import annotations

import secrets
from typing import Literal, NamedTuple

from .sdp import SDES_SUITES, SdesCrypto, SdpMedia, crypto_line

Mode = Literal["off", "optional", "mandatory"]
Key = tuple[str, bytes]
"""(suite, master key + salt): what :meth:`edge._rtp.Relay.set_srtp` takes."""

#: what the edge offers toward an SRTP side, in order of preference (tags 1, 2, ...):
#: the RFC 4568 suite every SDES implementation has, then AES-GCM (RFC 7714).
OFFERED_SUITES = ("AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM")


class SdesRefused(Exception):
    """The SDP breaks the side's SRTP mode: the call (or re-INVITE) is refused with 488."""


class Plan(NamedTuple):
    """What one SDP needs: the relay's contexts on the sender's leg and the SDP toward the other.

    :param rx: / :param tx: for ``Relay.set_srtp(sender_leg, rx, tx)`` (None: plain that way)
    :param secure: the profile of the rewritten SDP (``RTP/SAVP`` if True, ``RTP/AVP`` if
        False, as received if None)
    :param crypto: the edge's ``a=crypto`` lines for the rewritten SDP

    The offerer's contexts are set when its offer crosses (the edge picks the line it will
    answer right away), so an answer only adds the answerer's.
    """

    rx: Key | None
    tx: Key | None
    secure: bool | None
    crypto: tuple[bytes, ...]


class _Offer(NamedTuple):
    sender: str                     # relay leg that offered
    chosen: SdesCrypto | None       # the offerer's line the edge will answer (None: plain)
    profile_secure: bool            # the offer said RTP/SAVP (the answer keeps its profile)
    offered_srtp: bool              # the edge offered keys to the other leg


class SdesCall:
    """:param modes: the ``srtp`` mode of each relay leg (``"a"`` customer side, ``"b"`` carrier side)."""

    def __init__(self, modes: dict[str, Mode]) -> None:
        self.modes = modes
        self._keys: dict[tuple[str, str], bytes] = {}
        self._offer: _Offer | None = None
        self._answered = False
        #: per leg, the suite in use ("" = plain RTP), once an answer settled it
        self.suites: dict[str, str] = {}

    def _edge_key(self, leg: str, suite: str) -> bytes:
        """The edge's own master key + salt toward ``leg`` for ``suite``: made once, reused on re-offers
        (the relay keeps the context and its rollover counter when the key does not change)."""
        key = self._keys.get((leg, suite))
        if key is None:
            key = self._keys[(leg, suite)] = secrets.token_bytes(SDES_SUITES[suite])
        return key

    def _forget(self, leg: str) -> None:
        """``leg`` went plain: its edge keys go. A later SRTP session toward it starts at index 0
        again, so it must not reuse a key (the same key and index would repeat keystream)."""
        for suite in SDES_SUITES:
            self._keys.pop((leg, suite), None)

    def is_answer(self, sender: str, kind: Literal["offer", "answer"] | None) -> bool:
        """Whether an SDP from ``sender`` answers the pending offer: said by the caller, else inferred."""
        pending = self._offer is not None and self._offer.sender != sender
        if kind == "answer":
            return pending                      # an "answer" with no offer of the other leg is a late offer
        if kind == "offer":
            return False
        return pending and not self._answered

    def plan(self, sender: str, media: SdpMedia, kind: Literal["offer", "answer"] | None = None) -> Plan:
        """The SRTP part of relaying ``media`` from ``sender`` (``"a"``/``"b"``).

        :raises SdesRefused: the SDP breaks the sender's mode, or an answer lacks the SRTP its
            side must have
        """
        if self.is_answer(sender, kind):
            return self._answer(sender, media)
        return self._offer_from(sender, media)

    def _offer_from(self, sender: str, media: SdpMedia) -> Plan:
        mode = self.modes[sender]
        chosen = media.crypto[0] if media.crypto else None
        if media.secure:
            if mode == "off":
                raise SdesRefused(f"SRTP ({media.profile}) offered on a side with srtp = \"off\"")
            if chosen is None:
                raise SdesRefused("SRTP offered with no usable a=crypto line (suites: "
                                  + ", ".join(SDES_SUITES) + ")")
        elif mode == "off":
            chosen = None                       # best-effort SDES on a plain side: plain RTP
        elif chosen is None and mode == "mandatory":
            raise SdesRefused("plain RTP offered on a side with srtp = \"mandatory\"")
        other = "b" if sender == "a" else "a"
        other_mode = self.modes[other]
        crypto: tuple[bytes, ...] = ()
        if other_mode != "off":
            crypto = tuple(crypto_line(tag, suite, self._edge_key(other, suite))
                           for tag, suite in enumerate(OFFERED_SUITES, start=1))
        self._offer = _Offer(sender, chosen, media.secure, bool(crypto))
        self._answered = False
        if chosen is None:
            self._forget(sender)
        rx = (chosen.suite, chosen.key) if chosen is not None else None
        tx = (chosen.suite, self._edge_key(sender, chosen.suite)) if chosen is not None else None
        # mandatory offers SRTP only (RTP/SAVP); optional offers best-effort SDES on RTP/AVP
        return Plan(rx, tx, other_mode == "mandatory", crypto)

    def _answer(self, sender: str, media: SdpMedia) -> Plan:
        offer = self._offer
        assert offer is not None
        mode = self.modes[sender]
        rx = tx = None
        if media.port != 0:
            chosen = None
            if offer.offered_srtp:
                offered = {tag: suite for tag, suite in enumerate(OFFERED_SUITES, start=1)}
                chosen = next((c for c in media.crypto if offered.get(c.tag) == c.suite), None)
            if chosen is not None:
                rx = (chosen.suite, chosen.key)
                tx = (chosen.suite, self._edge_key(sender, chosen.suite))
            elif mode == "mandatory":
                raise SdesRefused("the answer has no SRTP on a side with srtp = \"mandatory\"")
            elif media.secure:
                raise SdesRefused("the answer's SRTP does not match any a=crypto line of the offer")
        if rx is None:
            self._forget(sender)
        self._answered = True
        back = offer.chosen
        crypto: tuple[bytes, ...] = ()
        if back is not None:
            crypto = (crypto_line(back.tag, back.suite, self._edge_key(offer.sender, back.suite)),)
        self.suites = {sender: rx[0] if rx else "", offer.sender: back.suite if back else ""}
        return Plan(rx, tx, offer.profile_secure, crypto)

    def echo(self, media: SdpMedia) -> Plan:
        """The edge answers ``a``'s offer itself (the echo number): its keys both ways on leg a."""
        plan = self._offer_from("a", media)
        chosen = self._offer.chosen if self._offer else None
        self._answered = True
        crypto: tuple[bytes, ...] = ()
        if chosen is not None and plan.tx is not None:
            crypto = (crypto_line(chosen.tag, chosen.suite, plan.tx[1]),)
        self.suites = {"a": chosen.suite if chosen else ""}
        return Plan(plan.rx, plan.tx, media.secure, crypto)
