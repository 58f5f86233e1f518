"""Per-carrier health settings (``[carriers.health]`` over ``[health]``), through a real edge.

Each carrier answers its OPTIONS from a script the test writes; a probe with no scripted
answer is held (the edge waits out its timeout, set long here), so the test reads the gauges
at a known point of each carrier's probe sequence instead of racing the probe timer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from edgeproc import EdgeProcess
from test_calls_raw import Carrier
from test_carrier_dns import metric
from test_carrier_health import wait_until

pytestmark = pytest.mark.timeout(120)


class ScriptedCarrier(Carrier):
    """Answers the n-th OPTIONS with the n-th status put in ``script``; holds it while none is there."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.script: queue.Queue[int] = queue.Queue()
        self.options = 0
        self.held: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.recv(0.1)
            except (TimeoutError, OSError):
                continue
            if not (msg.is_request and msg.method == "OPTIONS"):
                continue
            self.options += 1
            try:
                status = self.script.get_nowait()
            except queue.Empty:
                self.held.put((msg, self.last_addr))
                continue
            self.answer(msg, status)

    def release(self, status: int) -> None:
        """Answer the probe being held with ``status``."""
        msg, addr = self.held.get(timeout=10)
        self.last_addr = addr
        self.answer(msg, status)

    def wait_held(self) -> None:
        """Block until a probe is held: every probe before it has been recorded by the edge."""
        wait_until(f"a held probe at {self.host}", lambda: not self.held.empty())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        super().close()


@pytest.fixture
def carriers() -> Iterator[tuple[ScriptedCarrier, ScriptedCarrier, ScriptedCarrier]]:
    trio = ScriptedCarrier("127.0.0.2"), ScriptedCarrier("127.0.0.3"), ScriptedCarrier("127.0.0.4")
    yield trio
    for c in trio:
        c.close()


def up(edge: EdgeProcess, carrier: Carrier) -> float | None:
    return metric(edge, "edge_carrier_up", carrier=f"{carrier.host}:{carrier.port}")


def test_a_carrier_entry_overrides_threshold_recovery_and_enabled(
        tmp_path: Any, carriers: tuple[ScriptedCarrier, ScriptedCarrier, ScriptedCarrier]) -> None:
    plain, own, unprobed = carriers
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{plain.port}"\n'
             f'[[carriers]]\nuri = "sip:127.0.0.3:{own.port}"\n'
             '[carriers.health]\nthreshold = 3\nrecovery = 1\ninterval = 0.1\n'
             f'[[carriers]]\nuri = "sip:127.0.0.4:{unprobed.port}"\n'
             '[carriers.health]\nenabled = false\n'
             '[health]\nenabled = true\ninterval = 0.2\ntimeout = 30\nthreshold = 2\nrecovery = 2\n')
    for c in (plain, own):                  # scripted before the first probe goes out
        c.script.put(503)
        c.script.put(503)
    with EdgeProcess(tmp_path, extra_config=extra, sip_extra="rate_limit = 0", trusted=["127.0.0.9/32"]) as edge:
        # [health] threshold 2: down after two 503s
        wait_until("plain down", lambda: up(edge, plain) == 0)
        # its own threshold 3: two 503s recorded (the third probe is held) and still up
        own.wait_held()
        assert up(edge, own) == 1
        own.release(503)
        wait_until("own down after its third failure", lambda: up(edge, own) == 0)

        # its own recovery 1: one answered probe brings it back
        own.wait_held()
        own.release(200)
        wait_until("own up after one answer", lambda: up(edge, own) == 1)
        # [health] recovery 2: one answer (the next probe held) is not enough
        plain.wait_held()
        plain.release(200)
        plain.wait_held()
        assert up(edge, plain) == 0
        plain.release(200)
        wait_until("plain up after its second answer", lambda: up(edge, plain) == 1)

        assert unprobed.options == 0 and up(edge, unprobed) == 1   # enabled = false: never probed
        assert plain.options >= 4
