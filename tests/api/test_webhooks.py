"""Webhooks against a real ``sipedge serve`` and a local HTTP receiver (SPEC §5.3): signatures, a
receiver down then up (every event once or more, same id, in order per call), and kill -9 of the
edge with undelivered events (delivered after the restart). Events are caused through the API
(credit) and through the call path's store functions (a seizure and a settlement written by this
process into the edge's LMDB, as a SIP worker would)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from edgeproc import TOKEN, EdgeProcess

from edge.control import channels
from edge.control.credit import CreditEngine
from edge.control.models import LiveCall
from edge.control.store import Store

SECRET = "whsec_test_secret_0123456789"


class Receiver:
    """Records every POST whose Sipedge-Signature verifies; answers 503 while ``down``."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.bad_signatures = 0
        self.down = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                sig = dict(p.split("=", 1) for p in self.headers["Sipedge-Signature"].split(","))
                want = hmac.new(SECRET.encode(), f"{sig['t']}.".encode() + body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(want, sig["v1"]) or abs(time.time() - int(sig["t"])) > 300:
                    outer.bad_signatures += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                outer.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pred(), self.events

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def fast_retries(edge: EdgeProcess) -> EdgeProcess:
    edge.config.write_text(edge.config.read_text().replace(
        f'token = "{TOKEN}"\n', f'token = "{TOKEN}"\nwebhook_backoff_seconds = 0.3\nwebhook_backoff_max_seconds = 1\n'))
    return edge


def setup(edge: EdgeProcess, url: str) -> tuple[str, str]:
    with edge.client() as api:
        acct = api.post("/v1/accounts", json={"name": "Hooks", "admin": f"h.{uuid.uuid4().hex[:8]}"}).json()
        r = api.post(f"/v1/accounts/{acct['id']}/webhooks", json={
            "url": url, "secret": SECRET,
            "events": ["call.started", "call.ended", "credit.low", "auto_recharge.succeeded",
                       "auto_recharge.failed", "channels.exhausted"]})
        assert r.status_code == 201 and r.json()["secret"] == SECRET, r.text
        assert "secret" not in api.get(f"/v1/accounts/{acct['id']}/webhooks").json()[0]
        prof = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "P", "channels": 1}).json()
        return acct["id"], prof["id"]


def calls(data: Path, profile_id: str, n: int) -> list[str]:
    """n calls seized and settled through the call path's store functions (call.started, call.ended, and
    channels.exhausted: the profile has one channel)."""
    store = Store(data, map_size=256 << 20)
    engine = CreditEngine(store)
    ids = []
    try:
        for _ in range(n):
            call = LiveCall(call_id="c" + uuid.uuid4().hex[:16], profile_id=profile_id, direction="incoming",
                            started_at=time.time(), caller="+442071234567", callee="+14155550100")
            assert channels.take(store, profile_id, call)
            store.write(lambda txn, call=call: engine.settle(txn, call, None, time.time(), status=200,
                                                             end_reason="callee_bye"), sync=False, grows=False)
            ids.append(call.call_id)
        store.flush()
    finally:
        store.close()
    return ids


def check_order(events: list[dict], call_ids: list[str]) -> None:
    by_id: dict[str, dict] = {}
    for ev in events:
        assert by_id.setdefault(ev["id"], ev) == ev        # a repeat carries the same event
    for cid in call_ids:
        # order is kept per call (its order key); channels.exhausted is ordered per profile
        seq = [ev["type"] for ev in events if ev["type"].startswith("call.")
               and cid in (ev["data"].get("call_id"), ev["data"].get("cdr", {}).get("call_id"))]
        firsts = list(dict.fromkeys(seq))
        assert firsts[:1] == ["call.started"] and "call.ended" in firsts, (cid, seq)
        assert seq.index("call.ended") > seq.index("call.started")


def test_signed_events_and_a_receiver_down_then_up(tmp_path: Path, receiver: Receiver) -> None:
    with fast_retries(EdgeProcess(tmp_path)) as edge:
        acct, prof = setup(edge, receiver.url)
        with edge.client() as api:
            api.post(f"/v1/accounts/{acct}/credit", json={"amount": "1.00"})
            # below the minimum at once: credit.low, then a recharge that the master balance can pay
            api.put(f"/v1/profiles/{prof}/auto-recharge", json={"enabled": True, "amount": "1.00",
                                                               "min_balance": "0.50"})
        ids = calls(edge.data, prof, 2)
        receiver.wait(lambda: sum(e["type"] == "call.ended" for e in receiver.events) >= 2
                      and sum(e["type"] == "channels.exhausted" for e in receiver.events) >= 2)
        types = {e["type"] for e in receiver.events}
        assert {"credit.low", "auto_recharge.succeeded", "call.started", "call.ended",
                "channels.exhausted"} <= types
        ended = next(e for e in receiver.events if e["type"] == "call.ended")
        assert ended["data"]["cdr"]["end_reason"] == "callee_bye" and ended["created_at"].endswith("Z")
        check_order(receiver.events, ids)

        receiver.down = True
        before = len(receiver.events)
        more = calls(edge.data, prof, 3)
        with edge.client() as api:
            hook = api.get(f"/v1/accounts/{acct}/webhooks").json()[0]["id"]
            log_url = f"/v1/accounts/{acct}/webhooks/{hook}/deliveries"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pending = [d for d in api.get(log_url, params={"limit": 1000}).json()["items"]
                           if d["state"] == "pending" and len(d["attempts"]) >= 2]
                if pending:
                    break
                time.sleep(0.2)
            assert pending and all(a["status"] == 503 for a in pending[0]["attempts"])
        assert len(receiver.events) == before
        receiver.down = False
        receiver.wait(lambda: sum(e["type"] == "call.ended" for e in receiver.events) >= 5)
        check_order(receiver.events, ids + more)
        assert receiver.bad_signatures == 0
        with edge.client() as api:
            log = api.get(log_url, params={"limit": 1000}).json()["items"]
        assert log and all(d["state"] == "delivered" for d in log)


def test_undelivered_events_survive_kill_9(tmp_path: Path, receiver: Receiver) -> None:
    receiver.down = True
    edge = fast_retries(EdgeProcess(tmp_path)).start()
    try:
        _, prof = setup(edge, receiver.url)
        ids = calls(edge.data, prof, 3)
        time.sleep(1.0)                       # a few failed attempts
    finally:
        edge.stop(sig_kill=True)
    assert receiver.events == []
    receiver.down = False
    again = fast_retries(EdgeProcess(tmp_path))
    with again:
        receiver.wait(lambda: sum(e["type"] == "call.ended" for e in receiver.events) >= 3)
        check_order(receiver.events, ids)
