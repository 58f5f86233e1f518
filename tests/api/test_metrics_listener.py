"""``/metrics`` on a listener of its own (``api.metrics_listen``) and behind a key (``api.metrics_auth``),
over HTTP against real ``sipedge serve`` processes; ``sipedge status --config`` finds that listener."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from edgeproc import TOKEN, EdgeProcess, free_port


def _edge(tmp: Path, api_extra: str) -> EdgeProcess:
    edge = EdgeProcess(tmp)
    edge.config.write_text(edge.config.read_text().replace(f'token = "{TOKEN}"\n',
                                                           f'token = "{TOKEN}"\n{api_extra}'))
    return edge


def _problem(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    return r.json()["code"]


def test_metrics_on_its_own_listener_behind_a_metrics_key(tmp_path: Path) -> None:
    port = free_port()
    with _edge(tmp_path, f'metrics_listen = "127.0.0.1:{port}"\nmetrics_auth = true\n') as edge:
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        with edge.client() as admin:
            metrics_key = admin.post("/v1/api-keys", json={"scope": "metrics", "name": "prometheus"}).json()
            acct = admin.post("/v1/accounts", json={"name": "M", "admin": "m.admin"}).json()
            account_key = admin.post("/v1/api-keys", json={"scope": "account", "account_id": acct["id"]}).json()
            # the API port no longer serves /metrics
            assert admin.get("/metrics").status_code == 404
        assert httpx.get(edge.base + "/metrics").status_code in (401, 404)
        # the metrics listener: a metrics key or an admin key, nothing else
        anon = httpx.get(metrics_url)
        assert anon.status_code == 401 and _problem(anon) == "unauthorized"
        wrong = httpx.get(metrics_url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        other = httpx.get(metrics_url, headers={"Authorization": f"Bearer {account_key['key']}"})
        assert other.status_code == 403 and _problem(other) == "forbidden"
        for key in (metrics_key["key"], TOKEN):
            ok = httpx.get(metrics_url, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
            assert "edge_webhook_outbox_events" in ok.text and "edge_account_balance" in ok.text
        assert httpx.get(f"http://127.0.0.1:{port}/v1/accounts").status_code == 404
        # the metrics key opens nothing on the API
        with edge.client(metrics_key["key"]) as c:
            assert c.get("/v1/accounts").status_code == 403
        # sipedge status finds the listener in the config and sends its token there
        env = {k: v for k, v in os.environ.items() if k not in ("SIPEDGE_ADMIN_TOKEN", "SIPEDGE_API",
                                                                 "SIPEDGE_METRICS")}
        out = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config", str(edge.config), "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
        assert snap["api_error"] is None and acct["id"] in snap["accounts"]
        assert snap["totals"]["rss_bytes"] > 0           # read from the metrics listener


def test_metrics_behind_a_key_on_the_api_port(tmp_path: Path) -> None:
    with _edge(tmp_path, "metrics_auth = true\n") as edge:
        with edge.client() as admin:
            metrics_key = admin.post("/v1/api-keys", json={"scope": "metrics"}).json()
            assert admin.get("/metrics").status_code == 200           # the admin token reads it
        anon = httpx.get(edge.base + "/metrics")
        assert anon.status_code == 401 and _problem(anon) == "unauthorized"
        assert httpx.get(edge.base + "/healthz").status_code == 200   # still open
        with edge.client(metrics_key["key"]) as c:
            r = c.get("/metrics")
            assert r.status_code == 200 and "edge_build_info" in r.text
            assert c.get("/v1/profiles").status_code == 403
        with edge.client() as admin:
            admin.delete(f"/v1/api-keys/{metrics_key['id']}")
        with edge.client(metrics_key["key"]) as c:
            assert c.get("/metrics").status_code == 401                # revoked at once
