"""Carrier health (issue 11 item 3): OPTIONS probes mark a silent carrier down after
``threshold`` failures, routing skips it (the next call goes straight to the backup: no
INVITE, so no timeout, for the dead one), and ``recovery`` answers bring it back."""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from edgeproc import EdgeProcess
from test_calls_raw import Carrier, Pbx, new_profile

pytestmark = pytest.mark.timeout(60)


class ProbedCarrier(Carrier):
    """A raw carrier whose reader thread answers OPTIONS (while ``alive``) and queues the rest."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.alive = True
        self.options = 0
        self.requests: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.recv(0.1)
            except (TimeoutError, OSError):
                continue
            if msg.is_request and msg.method == "OPTIONS":
                self.options += 1
                if self.alive:
                    self.answer(msg, 200)
            elif msg.is_request and msg.method == "INVITE":
                self.requests.put((msg, self.last_addr))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        super().close()


@pytest.fixture
def carriers() -> Iterator[tuple[ProbedCarrier, ProbedCarrier]]:
    primary, backup = ProbedCarrier("127.0.0.2"), ProbedCarrier("127.0.0.3")
    yield primary, backup
    primary.close()
    backup.close()


@pytest.fixture
def edge(tmp_path: Any, carriers: tuple[ProbedCarrier, ProbedCarrier]) -> Iterator[EdgeProcess]:
    primary, backup = carriers
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{primary.port}"\npriority = 1\n'
             f'[[carriers]]\nuri = "sip:127.0.0.3:{backup.port}"\npriority = 2\n'
             '[health]\nenabled = true\ninterval = 0.2\ntimeout = 0.3\nthreshold = 2\nrecovery = 2\n')
    with EdgeProcess(tmp_path, extra_config=extra, sip_extra="rate_limit = 0") as proc:
        with proc.client() as api:
            api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200", "min_seconds": 60,
                                                  "increment_seconds": 6}]})
        yield proc


def carrier_up(edge: EdgeProcess, carrier: Carrier) -> float | None:
    text = httpx.get(edge.base + "/metrics", timeout=5).text
    pattern = r'^edge_carrier_up\{carrier="127\.0\.0\.\d:' + str(carrier.port) + r'"\} (\S+)$'
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else None


def wait_until(what: str, fn: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout waiting for {what}")
        time.sleep(0.05)


def first_invite(pbx: Pbx, prof: dict, carrier: ProbedCarrier) -> None:
    """A call whose first (and only) attempt reaches ``carrier``, which answers 486."""
    d = pbx.invite(prof, "+442071234567")
    assert d["first"].status == 407, d["first"].status
    msg, addr = carrier.requests.get(timeout=5)
    carrier.last_addr = addr
    carrier.answer(msg, 486)
    busy = pbx.recv_final()
    assert busy.status == 486
    # the ACK of a non-2xx is part of the INVITE transaction: same branch (RFC 3261 §17.1.1.3)
    pbx.send(pbx.request("ACK", d["ruri"], from_user=d["user"], to_user="+442071234567", call_id=d["call_id"],
                         cseq=2, from_tag=d["from_tag"], to_tag=busy.to_tag, branch=d["branch"]))


def test_a_silent_carrier_is_marked_down_skipped_and_back_when_it_answers(
        edge: EdgeProcess, carriers: tuple[ProbedCarrier, ProbedCarrier]) -> None:
    primary, backup = carriers
    wait_until("probes answered", lambda: primary.options >= 2 and backup.options >= 2)
    assert carrier_up(edge, primary) == 1 and carrier_up(edge, backup) == 1
    prof = new_profile(edge)
    pbx = Pbx(edge)
    try:
        first_invite(pbx, prof, primary)                 # up: the primary takes the call

        primary.alive = False
        wait_until("the primary marked down", lambda: carrier_up(edge, primary) == 0)
        first_invite(pbx, prof, backup)                  # down: straight to the backup
        assert primary.requests.empty()                  # no INVITE, so no timeout, for the dead one
        assert carrier_up(edge, backup) == 1

        primary.alive = True
        wait_until("the primary up again", lambda: carrier_up(edge, primary) == 1)
        first_invite(pbx, prof, primary)
        assert backup.requests.empty()
    finally:
        pbx.close()


def test_without_health_carriers_are_not_probed(tmp_path: Any) -> None:
    carrier = ProbedCarrier("127.0.0.2")
    try:
        extra = f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\n'
        with EdgeProcess(tmp_path, extra_config=extra) as proc:
            assert carrier_up(proc, carrier) == 1        # the gauge is there, at 1: not probed, not down
            time.sleep(0.5)
            assert carrier.options == 0
    finally:
        carrier.close()
