"""Many concurrent calls from several PBX processes against a profile with few channels:
channels in use never exceed the limit, and return to zero (SPEC §4.2 rule 4, §7)."""

from __future__ import annotations

import multiprocessing as mp
import random
import socket
import threading
import time

import httpx
import pytest
from edgeproc import EdgeProcess
from rawsip import sdp

from edge.sip import build_response, parse

CHANNELS = 3
PROCESSES = 4
CALLS_PER_PROCESS = 6


def carrier_loop(sock: socket.socket, stop: threading.Event) -> None:
    """Answer every INVITE after a short ring, accept every BYE."""
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        msg = parse(data)
        if not msg.is_request:
            continue
        if msg.method == "INVITE":
            sock.sendto(build_response(msg, 180, to_tag="gw"), addr)
            sock.sendto(build_response(msg, 200, to_tag="gw", headers=[
                ("Contact", f"<sip:gw@127.0.0.2:{sock.getsockname()[1]}>"), ("Content-Type", "application/sdp")],
                body=sdp(40000, host="127.0.0.2")), addr)
        elif msg.method in ("BYE", "CANCEL", "OPTIONS"):
            sock.sendto(build_response(msg, 200), addr)


def pbx_process(sip_port: int, user: str, password: str, index: int, out: mp.Queue, rounds) -> None:  # type: ignore[no-untyped-def]
    """CALLS_PER_PROCESS rounds; in each, every process sends its INVITE at once (a barrier) and
    holds an answered call until every process has its final answer (a second barrier), so
    PROCESSES attempts always meet CHANNELS channels, however slowly the processes start."""
    import sys
    from pathlib import Path

    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
    from test_calls_raw import Pbx

    class Edge:
        pass

    edge = Edge()
    edge.sip_port = sip_port
    prof = {"sip_username": user, "sip_password": password}
    results = []
    pbx = Pbx(edge)
    try:
        for _ in range(CALLS_PER_PROCESS):
            rounds.wait(60)
            d = pbx.invite(prof, "+442071234567")
            final = pbx.recv_final(timeout=10)
            rounds.wait(60)
            if final.status == 200:
                pbx.ack(d, final.to_tag)
                time.sleep(random.uniform(0.05, 0.3))
                pbx.bye(d, final.to_tag)
            else:
                pbx.send(pbx.request("ACK", d["ruri"], from_user=user, to_user="x", call_id=d["call_id"], cseq=2,
                                     from_tag=d["from_tag"], to_tag=final.to_tag, branch=d["branch"]))
            results.append(final.status)
    finally:
        pbx.close()
    out.put(results)


@pytest.fixture(scope="module")
def carrier():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.2", 0))
    stop = threading.Event()
    thread = threading.Thread(target=carrier_loop, args=(sock, stop), daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(2)
    sock.close()


def test_channels_never_exceed_the_limit(tmp_path, carrier: int) -> None:
    extra = f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier}"\npriority = 1\nweight = 100\n'
    with EdgeProcess(tmp_path, extra_config=extra, sip_extra="rate_limit = 0") as edge:
        with edge.client() as api:
            api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.02"}]})
            acct = api.post("/v1/accounts", json={"name": "Race", "admin": "race.admin"}).json()
            api.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": "100"})
            prof = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "few", "channels": CHANNELS}).json()
            api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "50"})
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            with edge.client() as api:
                while not stop.is_set():
                    peak = max(peak, api.get(f"/v1/profiles/{prof['id']}").json()["channels_in_use"])
                    time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        rounds = ctx.Barrier(PROCESSES)
        procs = [ctx.Process(target=pbx_process, args=(edge.sip_port, prof["sip_username"], prof["sip_password"], i,
                                                       queue, rounds)) for i in range(PROCESSES)]
        for p in procs:
            p.start()
        statuses = [s for _ in procs for s in queue.get(timeout=120)]
        for p in procs:
            p.join(10)
        stop.set()
        watcher.join(2)
        assert len(statuses) == PROCESSES * CALLS_PER_PROCESS
        assert set(statuses) <= {200, 486}
        # the first round meets free channels: CHANNELS answered, the rest refused (the barrier makes
        # a round's calls overlap); later rounds may meet a channel still being released
        assert statuses.count(200) >= CHANNELS and statuses.count(486) >= 1, statuses
        assert peak <= CHANNELS
        with edge.client() as api:
            def settled() -> bool:
                return api.get(f"/v1/profiles/{prof['id']}").json()["channels_in_use"] == 0
            deadline = time.monotonic() + 10
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert settled()
            assert api.get(f"/v1/profiles/{prof['id']}/calls").json() == []
            cdrs = api.get(f"/v1/profiles/{prof['id']}/cdrs", params={"limit": 1000}).json()["items"]
            # one CDR per admitted call; a call refused for want of a channel never took one
            assert sorted(c["status"] for c in cdrs) == [200] * statuses.count(200)
        text = httpx.get(edge.base + "/metrics").text
        assert 'edge_calls_rejected_total{direction="outgoing",rule="channels",status="486"}' in text
