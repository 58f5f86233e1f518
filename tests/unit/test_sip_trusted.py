"""SipService.is_trusted (edge/sip/core.py): [inbound] trusted, answered per host from memory."""
from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge.config import Config, InboundConfig
from edge.control.store import Store
from edge.sip.core import SipService
from edge.sip.dialog import Dialogs


def test_trusted_sources_are_answered_from_the_list_in_force(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", map_size=1 << 24)
    loop = asyncio.new_event_loop()
    try:
        sip = SipService(Config(inbound=InboundConfig(trusted=["127.0.0.2/32", "2001:db8::/32"])), store,
                         CollectorRegistry(), loop, Dialogs(loop))
        for _ in range(2):  # the second time from memory: the same answers
            assert sip.is_trusted("127.0.0.2") and sip.is_trusted("2001:db8::5")
            assert not sip.is_trusted("127.0.0.1") and not sip.is_trusted("gw.example.net")
        sip.reconfigure(Config(inbound=InboundConfig(trusted=["127.0.0.1/32"])))  # a reload forgets them
        assert sip.is_trusted("127.0.0.1") and not sip.is_trusted("127.0.0.2")
        for i in range(5000):  # a flood of sources does not grow the memory past its bound
            assert not sip.is_trusted(f"10.0.{i // 256}.{i % 256}")
        assert len(sip._trusted_hosts) <= 4096
        assert sip.is_trusted("127.0.0.1")
    finally:
        loop.close()
        store.close()
