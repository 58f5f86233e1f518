"""Carrier health: OPTIONS to each carrier, up or down by consecutive results (issue 11 item 3).

As Kamailio's dispatcher (``ds_ping_interval``, ``ds_probing_threshold``,
``ds_inactive_threshold``): every ``interval`` seconds each carrier gets an out-of-dialog
OPTIONS from the carrier side; ``threshold`` failures in a row (no final answer within
``timeout``, or 408/503) mark it down, ``recovery`` answers in a row mark it up again. Any
other final answer (200, 404, 405, ...) means a SIP stack is there and counts as alive.
Routing asks :meth:`CarrierHealth.is_up` and skips a down carrier, so a call meets no
timeout for it. ``edge_carrier_up{carrier}`` is 1 or 0 per carrier. Probing is off unless
``[health] enabled`` (the dispatcher's default too): carriers that are not told expect no
OPTIONS traffic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Gauge

from edge.config import CarrierConfig, HealthConfig
from edge.sip import SipMessage, parse_uri
from edge.sip.dialog import Local
from edge.sip.request import OutRequest, new_call_id, new_tag
from edge.sip.transaction import TransactionLayer
from edge.sip.transport import Peer

log = logging.getLogger("sipedge.calls")

DOWN_STATUSES = frozenset({408, 503})


def carrier_label(carrier: CarrierConfig) -> str:
    """The ``carrier`` label of a carrier: its URI's host:port."""
    uri = parse_uri(carrier.uri)
    return f"{uri.host}:{uri.port or 5060}"


class CarrierState:
    """Probe results of one carrier."""

    __slots__ = ("label", "peer", "ruri", "up", "failures", "successes")

    def __init__(self, label: str, peer: Peer, ruri: str) -> None:
        self.label = label
        self.peer = peer
        self.ruri = ruri
        self.up = True          # a carrier is trusted until probes say otherwise
        self.failures = 0       # in a row
        self.successes = 0      # in a row, while down

    def record(self, alive: bool, threshold: int, recovery: int) -> bool | None:
        """One probe result; returns the new state when it changed."""
        if alive:
            self.failures = 0
            if not self.up:
                self.successes += 1
                if self.successes >= recovery:
                    self.up, self.successes = True, 0
                    return True
            return None
        self.successes = 0
        self.failures += 1
        if self.up and self.failures >= threshold:
            self.up = False
            return False
        return None


class CarrierHealth:
    """:param local: how the edge names itself toward a peer (Via, Contact), as for calls."""

    def __init__(self, carriers: Sequence[CarrierConfig], settings: HealthConfig, tl: TransactionLayer,
                 local: Callable[[Peer], Local], registry: CollectorRegistry | None, domain: str) -> None:
        self.settings = settings
        self.tl = tl
        self.local = local
        self.domain = domain
        self.states: dict[str, CarrierState] = {}
        self.gauge = Gauge("edge_carrier_up", "1 while the carrier answers OPTIONS probes (always 1 unprobed)",
                           ["carrier"], registry=registry)
        self.replace_carriers(carriers)
        self._task: asyncio.Task[None] | None = None

    def replace_carriers(self, carriers: Sequence[CarrierConfig]) -> None:
        """Probe ``carriers`` from now on (a reload); a carrier kept by the new config keeps its state."""
        states: dict[str, CarrierState] = {}
        for carrier in carriers:
            uri = parse_uri(carrier.uri)
            peer = Peer((uri.params.get("transport") or "udp").lower(), uri.host, uri.port or 5060, side="carrier")
            label = carrier_label(carrier)
            host = f"[{uri.host}]" if ":" in uri.host else uri.host
            states.setdefault(label, self.states.get(label) or CarrierState(label, peer, f"sip:{host}:{peer.port}"))
        for label in self.states.keys() - states.keys():
            self.gauge.remove(label)
        for label, state in states.items():
            self.gauge.labels(label).set(1 if state.up else 0)
        self.states = states

    def is_up(self, carrier: CarrierConfig) -> bool:
        state = self.states.get(carrier_label(carrier))
        return state is None or state.up

    def start(self) -> None:
        if self.settings.enabled and self.states:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="carrier-health")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(state) for state in self.states.values()))
            await asyncio.sleep(self.settings.interval)

    async def probe(self, state: CarrierState) -> bool:
        """Send one OPTIONS to ``state``'s carrier; record and return whether it is alive."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[int] = loop.create_future()

        def on_response(msg: SipMessage) -> None:
            if msg.status >= 200 and not answer.done():
                answer.set_result(msg.status)

        def on_timeout() -> None:
            if not answer.done():
                answer.set_result(408)

        local = self.local(state.peer)
        request = OutRequest("OPTIONS", state.ruri, proto=state.peer.proto, via_host=local.via_host,
                             from_=f"<sip:health@{self.domain}>;tag={new_tag()}", to=f"<{state.ruri}>",
                             call_id=new_call_id(local.via_host.rpartition(":")[0] or "edge"), cseq=1,
                             headers=[("Contact", local.contact)])
        self.tl.send_request(request, state.peer, on_response=on_response, on_timeout=on_timeout)
        try:
            status = await asyncio.wait_for(answer, self.settings.timeout)
        except TimeoutError:
            status = 408
        alive = status not in DOWN_STATUSES
        changed = state.record(alive, self.settings.threshold, self.settings.recovery)
        if changed is not None:
            self.gauge.labels(state.label).set(1 if changed else 0)
            log.warning("carrier %s is %s", state.label, "up again" if changed else f"down (last probe: {status})",
                        extra={"event": "carrier_up" if changed else "carrier_down", "carrier": state.label})
        return alive
