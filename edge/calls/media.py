"""Media of a call: one relay per call, SDP anchored on it, the echo service.

Every SDP body that crosses the edge goes through :meth:`CallMedia.relay_sdp`: the
relay learns where the sender wants its audio and the body sent on names the edge's
ports of the other side (SPEC §4.5), with the edge's own SDES keys where that side
speaks SRTP (SPEC §4.6, edge/media/sdes.py). This is the one place where an SDP the edge
cannot anchor, or one that breaks a side's ``srtp`` mode, becomes an answer:
:class:`MediaRefused` with 488 (or 503 when no relay ports are free).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from edge._rtp import SrtpError
from edge.media.relay import MediaService
from edge.media.sdes import Mode, SdesCall, SdesRefused
from edge.media.sdp import SdpError, parse_sdp

from .model import Call, EndReason, Side

if TYPE_CHECKING:
    from edge._rtp import Relay

log = logging.getLogger("sipedge.calls")

SDP = ("Content-Type", "application/sdp")


class MediaRefused(Exception):
    """The call's media cannot be set up: the SIP status and the text for its Warning."""

    def __init__(self, status: int, reason: EndReason, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.text = text


class CallMedia:
    """:param rtp_timeout: seconds without RTP on both legs before the relay reports a timeout.
    :param srtp: the ``srtp`` mode of each side (``"customer"``, ``"carrier"``); ``"off"`` if missing.
    """

    def __init__(self, service: MediaService, rtp_timeout: float, srtp: dict[str, Mode] | None = None) -> None:
        self.service = service
        self.rtp_timeout = rtp_timeout
        self.srtp: dict[str, Mode] = {"customer": "off", "carrier": "off", **(srtp or {})}
        # per relay leg, once: iterating an Enum costs more than the rest of a relay's setup in Python
        self._leg_modes: dict[str, Mode] = {side.relay_leg: self.srtp[side.value] for side in Side}

    def open(self, call: Call) -> Relay:
        """The call's relay, created on first use."""
        if call.relay is None:
            try:
                call.relay = self.service.create(call.id, timeout=self.rtp_timeout)
            except RuntimeError as exc:  # the port range is exhausted
                log.error("call %s: %s", call.id, exc)
                raise MediaRefused(503, EndReason.NO_MEDIA_PORTS, "no media ports free on the edge") from None
            call.sdes = SdesCall(dict(self._leg_modes))
        return call.relay

    def relay_sdp(self, call: Call, sender: Side, sdp: bytes,
                  kind: Literal["offer", "answer"] | None = None) -> bytes:
        """SDP received from ``sender`` -> the SDP to send to the other side.

        :param kind: whether it is an offer or an answer, where the caller knows (INVITE,
            2xx/18x); else the call's offer/answer state decides (edge/media/sdes.py)
        """
        relay = self.open(call)
        assert call.sdes is not None
        leg = sender.relay_leg
        try:
            parsed = parse_sdp(sdp)  # once: the SRTP plan, the relay's remote and the rewrite read it
            plan = call.sdes.plan(leg, parsed.media, kind)
            relay.set_srtp(leg, plan.rx, plan.tx)
            return self.service.anchor(relay, leg, parsed, secure=plan.secure, crypto=plan.crypto)
        except SdpError as exc:
            raise MediaRefused(488, EndReason.BAD_SDP, f"SDP cannot be anchored: {exc}") from None
        except (SdesRefused, SrtpError) as exc:
            raise MediaRefused(488, EndReason.SRTP_POLICY, f"SRTP: {exc}") from None

    def relay_body(self, call: Call, sender: Side, body: bytes, content_type: str | None) -> bytes:
        """A body of an in-dialog request or answer: SDP is anchored, anything else passes."""
        if body and content_type and content_type.lower().startswith("application/sdp") and call.relay is not None:
            return self.relay_sdp(call, sender, body)
        return body

    def echo(self, call: Call, sdp: bytes) -> bytes:
        """The echo test number: the customer leg's audio goes back to it; the answer names that leg."""
        relay = self.open(call)
        assert call.sdes is not None
        try:
            parsed = parse_sdp(sdp)
            plan = call.sdes.echo(parsed.media)
            relay.set_srtp("a", plan.rx, plan.tx)
            return self.service.echo(relay, "a", parsed, secure=plan.secure, crypto=plan.crypto)
        except SdpError as exc:
            raise MediaRefused(488, EndReason.BAD_SDP, f"SDP cannot be anchored: {exc}") from None
        except (SdesRefused, SrtpError) as exc:
            raise MediaRefused(488, EndReason.SRTP_POLICY, f"SRTP: {exc}") from None

    def close(self, call: Call) -> dict[str, int]:
        """Free the relay; its per-leg counters for the CDR (a: customer side, b: carrier side)."""
        relay = call.relay
        if relay is None or relay.deleted:
            return {}
        counts = relay.delete_counts()  # only what the CDR keeps: no RelayStats built per call
        out: dict[str, int] = {}
        if counts is None:
            return out
        for name, (packets, nbytes, lost, dropped, jitter_ms) in zip("ab", counts, strict=True):
            out[f"{name}_packets"] = packets
            out[f"{name}_bytes"] = nbytes
            out[f"{name}_lost"] = lost
            out[f"{name}_dropped"] = dropped
            out[f"{name}_jitter_us"] = int(jitter_ms * 1000)
        return out
