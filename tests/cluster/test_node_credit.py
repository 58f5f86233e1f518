"""Money across two real cluster nodes on a 3-member engine (docs/cluster.md "Money across nodes"):
concurrent calls through both nodes against a balance that funds only some of them never spend
more than the balance, a top-up or allocation on any node moves its money once (also asked again on
the other node), and on every node each balance equals its ledger and the journal's."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from clusternodes import RingingCarrier, cdr_rows, invite_at_once, journal_of, metric_sum, node_pair, same_cdrs
from edgeproc import EdgeProcess
from natscluster import NatsCluster
from test_calls_raw import api_get, new_profile, wait_for

pytestmark = pytest.mark.timeout(240)

CREDIT = "0.05"         # the rate to 44 is 0.02/min billed per second: two first slices (60 s), then 30 s
PER_NODE = 3
MICRO = Decimal(1_000_000)


@pytest.fixture(scope="module")
def nodes(engine_cluster: NatsCluster, carrier: RingingCarrier,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeProcess, EdgeProcess, dict]]:
    yield from node_pair(engine_cluster.urls, engine_cluster.urls, carrier, tmp_path_factory, channels=8,
                         ports=19000, credit=CREDIT)


def money(text: str) -> int:
    return int(Decimal(text) * MICRO)


def ledger_total(node: EdgeProcess, owner: str) -> int:
    entries, after = [], 0
    while True:
        page = api_get(node, f"{owner}/ledger?after={after}&limit=1000")
        entries += page["items"]
        if not page.get("next_after"):
            return sum(money(e["amount"]) for e in entries)
        after = page["next_after"]


def balances_agree(node: EdgeProcess, prof: dict, expected: int) -> bool:
    """The node's balance of the profile is the journal's, and equals its ledger there."""
    balance = money(api_get(node, f"/v1/profiles/{prof['id']}")["balance"])
    return balance == expected and ledger_total(node, f"/v1/profiles/{prof['id']}") == expected


def seen(node: EdgeProcess, prof: dict, expected: int) -> str:
    owner = f"/v1/profiles/{prof['id']}"
    return (f"{node.data.name}: balance {api_get(node, owner)['balance']}, ledger {ledger_total(node, owner)}, "
            f"journal {expected}: {api_get(node, owner + '/ledger?limit=1000')['items']}")


def test_calls_through_both_nodes_never_spend_more_than_the_balance(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    start = journal_of(engine_cluster, prof["id"])
    assert start.balance == money(CREDIT) == sum(e.amount for e in start.entries())
    pbxs, dialogs, finals = invite_at_once((a, b), prof, carrier, PER_NODE)   # None: ringing, its slice reserved
    try:
        # 0.05 funds two first slices (0.02 each) and 30 s of a third, whichever nodes asked first;
        # then the balance is 0, below the minimum charge, for the other three
        assert len(carrier.ringing) == 3, finals
        assert sorted(s for s in finals if s is not None) == [402] * (2 * PER_NODE - 3)
        reserving = journal_of(engine_cluster, prof["id"])
        assert reserving.balance == 0
        assert sorted(c.reserved for c in reserving.state.calls.values()) == [10_000, 20_000, 20_000]
        for call_id in list(carrier.ringing):
            carrier.answer(call_id)
        answered = []
        for pbx, d, status in zip(pbxs, dialogs, finals, strict=True):
            if status is None:
                ok = pbx.recv_final(timeout=5)
                assert ok.status == 200
                pbx.ack(d, ok.to_tag)
                answered.append((pbx, d, ok.to_tag))
        time.sleep(1.0)
        for pbx, d, to_tag in answered:
            assert pbx.bye(d, to_tag).status == 200
        carrier.take(timeout=1.0)          # the edge's BYEs to the carrier
        # each call is billed its talk time (a second or two); what is left is the balance everywhere
        assert wait_for(lambda: journal_of(engine_cluster, prof["id"]).state.channels_in_use == 0, timeout=10)
        journal = journal_of(engine_cluster, prof["id"])
        spent = sum(s.cost for s in journal.state.settled.values())
        assert 0 < spent <= money(CREDIT)
        left = money(CREDIT) - spent
        assert journal.balance == left == sum(e.amount for e in journal.entries())
        for node in (a, b):
            assert wait_for(lambda n=node: balances_agree(n, prof, left), timeout=10), seen(node, prof, left)

        def costs() -> list[int]:     # the CDRs, from the journal's settlements: the same on both nodes
            rows = same_cdrs((a, b), prof) or []
            return [money(cost) for _, _, reason, cost in rows if reason != "credit"]

        assert wait_for(lambda: len(costs()) == 3, timeout=10), (cdr_rows(a, prof), cdr_rows(b, prof))
        assert all(c > 0 for c in costs()) and sum(costs()) == spent
        # the three refused for credit (402) have their CDRs on both nodes too, at 0
        assert [cost for _, _, reason, cost in same_cdrs((a, b), prof) or [] if reason == "credit"] == ["0.00"] * 3
        assert sum(metric_sum(n, "edge_cluster_reservations_total", result="ok") for n in (a, b)) == 3
        assert sum(metric_sum(n, "edge_calls_rejected_total", rule="credit", status="402") for n in (a, b)) == 3
    finally:
        carrier.ringing.clear()
        for pbx in pbxs:
            pbx.close()


def test_credit_on_any_node_moves_once_and_every_node_sees_it(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    account = f"/v1/accounts/{prof['account_id']}"
    before = journal_of(engine_cluster, prof["id"]).balance
    master = money(api_get(a, account)["balance"])
    key = {"Idempotency-Key": uuid.uuid4().hex}
    with b.client() as api:
        first = api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "1.00"}, headers=key)
        assert first.status_code == 200, first.text
        assert money(first.json()["balance"]) == before + 1_000_000
        # the same key again, here and on the other node: the money moved once
        again = api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "1.00"}, headers=key)
        assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
        other = api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "2.00"}, headers=key)
        assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
        too_much = api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "1000000.00"})
        assert too_much.status_code == 409 and too_much.json()["code"] == "insufficient_funds"
        top = api.post(f"{account}/credit", json={"amount": "3.00"})
        assert top.status_code == 200, top.text
    with a.client() as api:
        retried = api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "1.00"}, headers=key)
        assert retried.status_code == 200, retried.text
    journal = journal_of(engine_cluster, prof["id"])
    assert journal.balance == before + 1_000_000 == sum(e.amount for e in journal.entries())
    for node in (a, b):     # the journal's balances, within a refresh, and each equal to the node's ledger
        assert wait_for(lambda n=node: balances_agree(n, prof, before + 1_000_000), timeout=10), \
            seen(node, prof, before + 1_000_000)
        assert wait_for(lambda n=node: money(api_get(n, account)["balance"]) == master - 1_000_000 + 3_000_000,
                        timeout=10)
        assert ledger_total(node, account) == master + 2_000_000
    with a.client() as api:
        refused = api.put(f"/v1/profiles/{prof['id']}/bundles", json={"us_bundles": 1})
        assert refused.status_code == 409 and refused.json()["code"] == "cluster_unsupported"


def recharges(node: EdgeProcess, prof: dict) -> int:
    items = api_get(node, f"/v1/profiles/{prof['id']}/ledger?limit=1000")["items"]
    return sum(e["kind"] == "auto_recharge_in" for e in items)


def test_auto_recharge_on_a_cluster_moves_once_per_trigger(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, _ = nodes
    prof = new_profile(b, channels=2, credit="0.02")
    owner, account = f"/v1/profiles/{prof['id']}", f"/v1/accounts/{prof['account_id']}"
    assert wait_for(lambda: api_get(a, owner).get("balance") is not None, timeout=5)
    master = money(api_get(b, account)["balance"])

    def everywhere(balance: int, master_after: int, count: int) -> bool:
        return all(balances_agree(n, prof, balance) and money(api_get(n, account)["balance"]) == master_after
                   and ledger_total(n, account) == master_after and recharges(n, prof) == count for n in (a, b))

    # enabled on A below the minimum: the node rendezvous hashing picks recharges, once
    with a.client() as api:
        set_ = api.put(f"{owner}/auto-recharge", json={"enabled": True, "amount": "0.10", "min_balance": "0.11"})
        assert set_.status_code == 200, set_.text
    assert wait_for(lambda: everywhere(120_000, master - 100_000, 1), timeout=10), seen(a, prof, 120_000)
    time.sleep(2 * 1.0)          # two refresh periods with no movement: no second recharge
    assert everywhere(120_000, master - 100_000, 1)
    # a call's first slice (0.02) takes the balance below the minimum: one more recharge, then its release
    pbxs, _, finals = invite_at_once((a,), prof, carrier, 1)
    try:
        assert finals == [None]
        assert wait_for(lambda: everywhere(200_000, master - 200_000, 2), timeout=10), seen(a, prof, 200_000)
    finally:
        carrier.refuse_all()
        for pbx in pbxs:
            pbx.close()
    assert wait_for(lambda: everywhere(220_000, master - 200_000, 2), timeout=10), seen(a, prof, 220_000)
    journal = journal_of(engine_cluster, prof["id"])
    assert sorted(k for k in journal.state.keys if k.startswith("i:ar-")) == [
        f"i:ar-{prof['id']}-1", f"i:ar-{prof['id']}-2"]
