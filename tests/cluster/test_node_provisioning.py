"""Provisioning on any node of a real cluster (docs/cluster.md "Provisioning on any node"): what one node's
API creates or changes, every node has for its next call; two nodes provisioning the same thing at once
get one answer each, exactly one of them a success; a node that joins with an empty store gets the whole
provisioning from the engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
from clusternodes import CALLEE, RingingCarrier, cluster_nodes, invite_at_once
from edgeproc import EdgeProcess
from natscluster import NatsCluster
from test_calls_raw import Pbx, api_get, register_pbx, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def nodes(engine_cluster: NatsCluster, carrier: RingingCarrier,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EdgeProcess]]:
    started = cluster_nodes([engine_cluster.urls] * 2, carrier, tmp_path_factory, channels=2, ports=21000,
                            credit="0")
    found, _ = next(started)
    try:
        yield found
    finally:
        started.close()


def call(node: EdgeProcess, method: str, path: str, **kwargs: object) -> httpx.Response:
    with node.client() as api:
        return api.request(method, path, **kwargs)  # type: ignore[arg-type]


def seen_on(node: EdgeProcess, path: str) -> dict | None:
    answer = call(node, "GET", path)
    return answer.json() if answer.status_code == 200 else None


def balance(node: EdgeProcess, owner: str) -> Decimal:
    return Decimal(api_get(node, owner)["balance"])


def test_what_one_node_provisions_the_other_has_for_its_next_call(
        nodes: list[EdgeProcess], carrier: RingingCarrier) -> None:
    a, b = nodes
    acct = call(b, "POST", "/v1/accounts", json={"name": "Provisioned on B", "admin": "prov.b"}).json()
    assert call(b, "POST", f"/v1/accounts/{acct['id']}/credit", json={"amount": "10.00"}).status_code == 200
    created = call(b, "POST", f"/v1/accounts/{acct['id']}/profiles", json={"name": "PBX", "channels": 2})
    assert created.status_code == 201, created.text
    prof = created.json()
    assert call(b, "POST", f"/v1/profiles/{prof['id']}/credit", json={"amount": "1.00"}).status_code == 200
    assert call(b, "POST", f"/v1/accounts/{acct['id']}/numbers", json={"number": "+442070000101"}).status_code == 201
    assert call(b, "POST", f"/v1/profiles/{prof['id']}/numbers", json={"number": "+442070000101"}).status_code == 201

    # node A has the account, the profile with its credential and number, and (from the journal) its money
    on_a = wait_for(lambda: seen_on(a, f"/v1/profiles/{prof['id']}"), timeout=5)
    assert (on_a["name"], on_a["channels"], on_a["sip_username"], on_a["numbers"]) == (
        "PBX", 2, prof["sip_username"], ["+442070000101"])
    assert wait_for(lambda: balance(a, f"/v1/profiles/{prof['id']}") == 1, timeout=5)
    assert wait_for(lambda: balance(a, f"/v1/accounts/{acct['id']}") == 9, timeout=5)
    assert seen_on(a, f"/v1/profiles/{prof['id']}/credentials") == seen_on(b, f"/v1/profiles/{prof['id']}/credentials")

    # ... so a PBX registers and calls through A with what B provisioned
    pbx = Pbx(a)
    try:
        register_pbx(pbx, prof)
    finally:
        pbx.close()
    pbxs, _, finals = invite_at_once((a,), prof, carrier, 1)
    try:
        assert finals == [None] and len(carrier.ringing) == 1   # authenticated, admitted, at the carrier
    finally:
        carrier.refuse_all()
        for p in pbxs:
            p.close()

    # a change on A is B's too: B answers with it as soon as A has answered
    changed = call(a, "PATCH", f"/v1/profiles/{prof['id']}", json={"name": "PBX renamed", "channels": 1})
    assert changed.status_code == 200, changed.text
    assert wait_for(lambda: seen_on(b, f"/v1/profiles/{prof['id']}")["channels"] == 1, timeout=5)
    assert seen_on(b, f"/v1/profiles/{prof['id']}")["name"] == "PBX renamed"
    # the balance a change carries is never copied: it stays the journal's on both nodes
    for node in (a, b):           # (the refused call's reservation back)
        assert wait_for(lambda node=node: balance(node, f"/v1/profiles/{prof['id']}") == 1, timeout=5)


def at_once(*requests: tuple[EdgeProcess, str, dict]) -> list[int]:
    """POST each (node, path, body) at the same instant, each from its own thread: their statuses."""
    go = threading.Barrier(len(requests))
    statuses: list[int] = [0] * len(requests)

    def post(i: int) -> None:
        node, path, body = requests[i]
        go.wait()
        statuses[i] = call(node, "POST", path, json=body).status_code

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return statuses


def test_two_nodes_buying_the_same_number_at_once_sell_it_once(nodes: list[EdgeProcess]) -> None:
    a, b = nodes
    acct = call(a, "POST", "/v1/accounts", json={"name": "Race", "admin": "prov.race"}).json()
    other = call(b, "POST", "/v1/accounts", json={"name": "Race 2", "admin": "prov.race2"}).json()
    wait_for(lambda: seen_on(b, f"/v1/accounts/{acct['id']}") and seen_on(a, f"/v1/accounts/{other['id']}"),
             timeout=5)
    for i in range(6):
        number = f"+44207000020{i}"
        statuses = at_once((a, f"/v1/accounts/{acct['id']}/numbers", {"number": number}),
                           (b, f"/v1/accounts/{other['id']}/numbers", {"number": number}))
        assert sorted(statuses) == [201, 409], (number, statuses)
        winner = acct if statuses[0] == 201 else other
        for node in (a, b):       # both nodes sold it to the same account
            owned = wait_for(lambda node=node, winner=winner: seen_on(node, f"/v1/accounts/{winner['id']}/numbers"),
                             timeout=5)
            assert number in [n["number"] for n in owned]
    # the same admin login on both nodes at once: one account
    twin = {"name": "Twin", "admin": "prov.twin"}
    assert sorted(at_once((a, "/v1/accounts", twin), (b, "/v1/accounts", twin))) == [201, 409]


def test_a_rate_table_loaded_on_one_node_rates_the_next_call_on_the_other(nodes: list[EdgeProcess]) -> None:
    a, b = nodes
    rows = [{"prefix": f"49{n:05d}", "rate": "0.0100"} for n in range(5000)] + [{"prefix": "44", "rate": "0.0300"}]
    loaded = call(b, "PUT", "/v1/rates", json={"rates": rows}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    for node in (a, b):          # the whole new table (three chunks) or the old one, never a mix
        rate = wait_for(lambda node=node: seen_on(node, "/v1/rates/lookup?number=%2B4904999123"), timeout=5)
        assert Decimal(rate["rate"]) == Decimal("0.01")
        uk = seen_on(node, f"/v1/rates/lookup?number={CALLEE.replace('+', '%2B')}")
        assert Decimal(uk["rate"]) == Decimal("0.03")


def test_a_node_that_joins_empty_gets_the_whole_provisioning(
        nodes: list[EdgeProcess], engine_cluster: NatsCluster, carrier: RingingCarrier,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    a, _ = nodes
    accounts = api_get(a, "/v1/accounts?limit=1000")["items"]
    profiles = api_get(a, "/v1/profiles?limit=1000")["items"]
    engine = ", ".join(f'"{url}"' for url in engine_cluster.urls)
    late = EdgeProcess(tmp_path_factory.mktemp("late"), workers=1, sip_extra="rate_limit = 0",
                       media_ports=(22500, 22999),
                       extra_config=f'[cluster]\nnode = "edge-late"\nengine = [{engine}]\nlease_seconds = 3\n'
                                    f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n')
    try:
        late.start(timeout=40)       # ready only once the stream's changes are applied
        assert [x["id"] for x in api_get(late, "/v1/accounts?limit=1000")["items"]] == [x["id"] for x in accounts]
        here = {p["id"]: p for p in api_get(late, "/v1/profiles?limit=1000")["items"]}
        assert set(here) == {p["id"] for p in profiles}
        for p in profiles:           # balances from the journals, settings from the provisioning
            assert (here[p["id"]]["name"], here[p["id"]]["channels"], here[p["id"]]["sip_username"]) == (
                p["name"], p["channels"], p["sip_username"])
            assert wait_for(lambda p=p: balance(late, f"/v1/profiles/{p['id']}") == Decimal(p["balance"]), timeout=5)
        assert Decimal(api_get(late, "/v1/rates/lookup?number=%2B4900001")["rate"]) == Decimal("0.01")
    finally:
        late.stop()


def console_sign_in(node: EdgeProcess, login: str, password: str) -> httpx.Response:
    """The console's sign-in form (its double-submit token: the same value as cookie and field)."""
    with httpx.Client(base_url=node.base, timeout=10.0) as web:
        return web.post("/console/sign-in", data={"login": login, "password": password, "sign_in_token": "t0ken"},
                        cookies={"sipedge_console_signin": "t0ken"})


def test_a_console_session_of_one_node_signs_in_on_the_other_and_failures_add_up(nodes: list[EdgeProcess]) -> None:
    a, b = nodes
    password = "correct horse battery staple 42"
    logins = {}
    for name in ("console", "guessed"):
        acct = call(a, "POST", "/v1/accounts", json={"name": f"Console {name}", "admin": f"{name}.admin"}).json()
        set_password = call(a, "PUT", f"/v1/accounts/{acct['id']}/admin-password", json={"password": password})
        assert set_password.status_code == 204, set_password.text
        logins[name] = acct
    page = f"/console/accounts/{logins['console']['id']}"

    # signed in through A (a session is a provisioning change): the session cookie works on B
    signed = console_sign_in(a, "console.admin", password)
    assert signed.status_code == 303, signed.text
    token = signed.cookies["sipedge_console"]
    for node in (a, b):
        with httpx.Client(base_url=node.base, timeout=10.0) as web:
            assert web.get(page, cookies={"sipedge_console": token}).status_code == 200
            assert web.get(page).status_code == 303          # without it: the sign-in page
    with httpx.Client(base_url=b.base, timeout=10.0) as web:   # signed out on B: gone on A too
        form = web.get(page, cookies={"sipedge_console": token}).text
        assert 'name="csrf" value="' in form
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        out = web.post("/console/sign-out", data={"csrf": csrf}, cookies={"sipedge_console": token})
        assert out.status_code == 303, out.text
    assert wait_for(lambda: httpx.get(a.base + page, cookies={"sipedge_console": token}).status_code == 303)

    # wrong passwords on both nodes count together: the fifth locks the login on every node
    statuses = [console_sign_in(node, "guessed.admin", f"wrong {i}").status_code
                for i, node in enumerate((a, b, a, b, a))]
    assert statuses == [401, 401, 401, 401, 429], statuses
    assert console_sign_in(b, "guessed.admin", password).status_code == 429     # the right one too, for now
