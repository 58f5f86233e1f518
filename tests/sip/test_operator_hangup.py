"""``POST /v1/calls/{id}/hangup`` against a real edge and a raw-socket PBX on the echo number: the
API writes the request into LMDB, the process that owns the call ends it with a BYE whose Reason
says so, and billing settles it as usual (CDR ``end_reason`` ``operator``)."""

from __future__ import annotations

import time

from edgeproc import EdgeProcess
from test_calls_raw import Pbx, new_profile

from edge.sip import parse


def test_the_operator_ends_a_live_call(tmp_path) -> None:
    with EdgeProcess(tmp_path, sip_extra="rate_limit = 0") as edge:
        prof = new_profile(edge, credit="0")
        pbx = Pbx(edge)
        try:
            d = pbx.invite(prof, "+17606604690")
            ok = pbx.recv_final()
            assert ok.status == 200
            pbx.ack(d, ok.to_tag)
            with edge.client() as api:
                [call] = api.get(f"/v1/profiles/{prof['id']}/calls").json()
                r = api.post(f"/v1/calls/{call['call_id']}/hangup", json={"cause": 487})
                assert r.status_code == 202 and r.json()["call_id"] == call["call_id"], r.text
                pbx.sock.settimeout(5)                           # the BYE comes, or recv raises
                while True:
                    bye = parse(pbx.sock.recv(65535))
                    if bye.is_request and bye.method == "BYE":
                        break
                assert 'text="Ended by the operator"' in bye.header("Reason") and "cause=487" in bye.header("Reason")
                deadline = time.monotonic() + 5
                while api.get(f"/v1/profiles/{prof['id']}").json()["channels_in_use"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                [cdr] = api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"]
                assert cdr["end_reason"] == "operator"
                again = api.post(f"/v1/calls/{call['call_id']}/hangup")
                assert again.status_code == 404 and again.json()["code"] == "call_not_found"
        finally:
            pbx.close()
