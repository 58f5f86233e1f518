"""asyncio side of the relay engine: timeout events and SDP anchoring for the B2BUA.

The engine's packet thread never calls Python. It queues events and makes its
eventfd readable; :class:`MediaService` watches that fd with
``loop.add_reader`` and hands each event to a callback on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge._rtp import Relay, RelayEngine, RelayEvent
from edge.media.sdp import ParsedSdp, SdpError, parse_sdp, rewrite_sdp

if TYPE_CHECKING:
    from edge._rtp import Leg

log = logging.getLogger("edge.media")

EventCallback = Callable[[int, str, str], object]
"""``callback(relay_id, tag, kind)``; ``kind`` is ``"timeout"``."""


class MediaService:
    """Owns a :class:`RelayEngine` on an asyncio loop.

    :param engine: the relay engine (started by :meth:`start` if not running)
    :param loop: the event loop; the running loop by default
    :param on_event: called as ``on_event(relay_id, tag, kind)`` for each event
    :param advertise: per leg (``"a"``: customer side, ``"b"``: carrier side), the address
        written into the SDP sent to that leg (1:1 NAT, ``media_advertise``); a leg missing
        here advertises the address its ports bind to
    """

    def __init__(
        self,
        engine: RelayEngine,
        loop: asyncio.AbstractEventLoop | None = None,
        on_event: EventCallback | None = None,
        advertise: dict[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.advertise = {"a": engine.address, "b": engine.address_b, **(advertise or {})}
        self._loop = loop
        self.on_event = on_event
        self._reading = False

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self.engine.start()
        if not self._reading:
            self._loop.add_reader(self.engine.event_fd, self._on_readable)
            self._reading = True

    def close(self) -> None:
        """Stop watching, stop the engine and free every port. Idempotent."""
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.engine.event_fd)
            self._reading = False
        self.engine.stop()

    async def __aenter__(self) -> MediaService:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _on_readable(self) -> None:
        # Boundary between the engine and the B2BUA: nothing escapes to the loop.
        try:
            events = self.engine.drain_events()
        except Exception:
            log.exception("drain_events failed")
            return
        for ev in events:
            self._dispatch(ev)

    def _dispatch(self, ev: RelayEvent) -> None:
        if self.on_event is None:
            log.info("relay %d (%s): %s on leg %s", ev.relay_id, ev.tag, ev.kind, ev.leg)
            return
        try:
            self.on_event(ev.relay_id, ev.tag, ev.kind)
        except Exception:
            log.exception("media event callback failed for relay %d", ev.relay_id)

    # -- anchoring helpers for the B2BUA --------------------------------------

    def create(self, tag: str, *, timeout: float | None = None) -> Relay:
        return self.engine.create(tag, timeout=timeout)

    def anchor(self, relay: Relay, from_leg: Leg, sdp: bytes | ParsedSdp, *, secure: bool | None = None,
               crypto: tuple[bytes, ...] = ()) -> bytes:
        """Take the SDP received on ``from_leg``; return the SDP for the other leg.

        The remote of ``from_leg`` is set from the SDP (offer, answer,
        re-INVITE, hold), which re-arms latching on that leg. The returned SDP
        points the other side at the edge ports of its own leg.

        :param relay: the call's relay
        :param from_leg: ``"a"`` (SDP from the PBX) or ``"b"`` (SDP from the carrier)
        :param sdp: the SDP body as received, or what :func:`parse_sdp` read of it
        :param secure: / :param crypto: the profile and the edge's ``a=crypto`` lines of the
            returned SDP (edge/media/sdes.py); the sender's ``a=crypto`` lines never pass
        """
        parsed = sdp if isinstance(sdp, ParsedSdp) else parse_sdp(sdp)
        media = parsed.media
        try:
            relay.set_remote(from_leg, media.host, media.port, media.rtcp_port)
        except ValueError as exc:  # a host name in c=, or an IPv4 address offered on an IPv6 side
            raise SdpError(str(exc)) from None
        to_leg = "b" if from_leg.lower() == "a" else "a"
        out = relay.leg_b if to_leg == "b" else relay.leg_a
        return rewrite_sdp(parsed, self.advertise[to_leg], out.rtp_port, out.rtcp_port, secure=secure,
                           crypto=crypto)

    def echo(self, relay: Relay, leg: Leg, sdp: bytes | ParsedSdp, *, secure: bool | None = None,
             crypto: tuple[bytes, ...] = ()) -> bytes:
        """Echo ``leg``'s audio back to it; the SDP answer names that leg's own port."""
        parsed = sdp if isinstance(sdp, ParsedSdp) else parse_sdp(sdp)
        media = parsed.media
        try:
            relay.set_remote(leg, media.host, media.port, media.rtcp_port)
        except ValueError as exc:
            raise SdpError(str(exc)) from None
        relay.set_echo(leg)
        own = relay.leg_a if leg == "a" else relay.leg_b
        return rewrite_sdp(parsed, self.advertise[leg], own.rtp_port, own.rtcp_port, secure=secure, crypto=crypto)
