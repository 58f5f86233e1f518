"""The shipped dashboard and alert rules against a real Prometheus scraping a real edge (issue 6).

How it works:

1. ``ensure_prometheus()`` installs the Debian package ``prometheus`` when missing (the suite runs as
   root; the test is skipped, naming the reason, only when installing is impossible).
2. A real ``sipedge serve`` is provisioned (tests/ops/opstraffic.py), a Prometheus is started on
   loopback (free port, temp storage, scrape and rule evaluation every second, the edge as job
   ``sipedge``, ``deploy/prometheus/alerts.yml`` as its rule file); once the edge is scraped, real SIP
   goes through the edge: answered calls with RTP (and lost packets), a carrier failover, a refused call,
   rejected INVITEs, wrong passwords until a source is blocked, a malformed message, a registration and
   a call left up on a one-channel profile. Then we wait for two more scrapes.
3. Every PromQL expression of every panel of ``deploy/grafana/sipedge.json`` is evaluated through
   ``/api/v1/query`` with the dashboard variables replaced as Grafana would (``$instance`` and
   ``$profile`` by the real values, regex-escaped; ``$__rate_interval``/``$__interval``/``$__range``
   by ``1m``): an error or an empty result fails. The variable queries themselves are checked too.
4. Every alert rule, read back from Prometheus' ``/api/v1/rules`` (so Prometheus loaded and evaluated
   them: health must be ok), is evaluated twice: as written (must not error; it may legitimately be empty
   when nothing is wrong) and with ``bool`` after each comparison operator (``promserver.with_bool``): a
   filter becomes a 0/1 result for every series its sides match, so an empty result means a metric is
   missing or the rule's vector matching never pairs anything. Rules whose condition the traffic really
   creates (a full one-channel profile, credit below the minimum with auto-recharge off, a profile that
   cannot auto-recharge, a blocked source still sending) must be pending or firing in ``/api/v1/alerts``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from opstraffic import drive_or_explain, ops_edge
from promserver import PrometheusProcess, ensure_prometheus, with_bool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/sipedge.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
EXAMPLE_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"

# Alerts the traffic of opstraffic.drive() makes true (their `for:` keeps them pending).
EXPECTED_ACTIVE = {
    "SipedgeProfileChannelsNearlyFull": {"profile_name": "Branch"},
    "SipedgeCreditLowAutoRechargeOff": {"profile_name": "Branch"},
    "SipedgeCreditLowAutoRechargeFailing": {"profile_name": "Broke"},
    "SipedgeAuthSourceBlocked": {},
}


@pytest.fixture(scope="module")
def prom_tools() -> None:
    reason = ensure_prometheus()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prom_tools):
    """(ops edge, prometheus), traffic done and scraped."""
    tmp = tmp_path_factory.mktemp("ops-prom")
    with ops_edge(tmp / "edge", traffic=False) as ops:
        target = f"127.0.0.1:{ops.edge.api_port}"
        with PrometheusProcess(tmp / "prom", target, rule_files=[ALERTS]) as prom:
            prom.wait_scrapes_after(time.time(), scrapes=1)
            drive_or_explain(ops)
            prom.wait_scrapes_after(time.time(), scrapes=2)
            yield ops, prom


# ------------------------------------------------------------------ static checks

def test_promtool_check_rules(prom_tools) -> None:
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_check_example_config(prom_tools) -> None:
    out = subprocess.run(["promtool", "check", "config", str(EXAMPLE_CONFIG)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))          # collapsed rows hold their panels
    return out


def test_dashboard_is_importable() -> None:
    """The shape Grafana's import needs, a datasource variable used by every panel and query."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"instance", "profile"} <= variables.keys()
    ds = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
    for name in ("instance", "profile"):
        assert variables[name]["datasource"] == ds


# ------------------------------------------------------------------ against Prometheus

def grafana_regex_escape(value: str) -> str:
    """What Grafana does to a variable value interpolated into a regex matcher (then PromQL-quoted)."""
    return re.sub(r"([\\^$*+?.()|{}\[\]/])", r"\\\\\1", value)


def interpolate(expr: str, values: dict[str, list[str]]) -> str:
    for name in ("__rate_interval", "__interval", "__range"):
        expr = expr.replace("${" + name + "}", "1m").replace("$" + name, "1m")
    for name, vals in values.items():
        rendered = "(" + "|".join(grafana_regex_escape(v) for v in vals) + ")" if len(vals) > 1 else \
            grafana_regex_escape(vals[0])
        expr = expr.replace("${" + name + "}", rendered)
        expr = re.sub(r"\$" + name + r"\b", lambda m, rendered=rendered: rendered, expr)
    assert "$" not in expr, f"uninterpolated variable in {expr}"
    return expr


def test_every_dashboard_expression_returns_series(stack) -> None:
    ops, prom = stack
    dash = json.loads(DASHBOARD.read_text())
    values = {"instance": [prom.target], "profile": [ops.hq["id"], ops.branch["id"], ops.broke["id"]]}
    failures, checked = [], 0
    for p in panels(dash):
        for t in p.get("targets", []):
            expr = interpolate(t["expr"], values)
            checked += 1
            try:
                result = prom.query(expr)["result"]
            except Exception as exc:  # report every failing expression at once
                failures.append(f"{p['title']} [{t['refId']}]: {expr}\n    error: {exc}")
                continue
            if not result:
                failures.append(f"{p['title']} [{t['refId']}]: {expr}\n    no series")
    assert checked >= 40
    assert not failures, "dashboard expressions failing:\n" + "\n".join(failures)


def grafana_query_result_lines(result: list[dict]) -> list[str]:
    """Grafana's text for ``query_result()`` items: ``name{k="v",...} value timestamp_ms``."""
    lines = []
    for item in result:
        labels = dict(item["metric"])
        name = labels.pop("__name__", "")
        ts, value = item["value"]
        matchers = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(name + "{" + matchers + "} " + f"{value} {int(float(ts) * 1000)}")
    return lines


def test_dashboard_variables_resolve(stack) -> None:
    ops, prom = stack
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    # instance: label_values(metric, label)
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variables["instance"]["query"]["query"])
    assert m, variables["instance"]["query"]
    got = {s["metric"].get(m.group(2)) for s in prom.query(m.group(1))["result"]}
    assert prom.target in got
    # profile: query_result(...) filtered by a regex with named groups value/text (ids shown by name)
    m = re.fullmatch(r"query_result\((.+)\)", variables["profile"]["query"]["query"])
    assert m, variables["profile"]["query"]
    expr = interpolate(m.group(1), {"instance": [prom.target]})
    lines = grafana_query_result_lines(prom.query(expr)["result"])
    js_regex = variables["profile"]["regex"].strip("/")
    rx = re.compile(js_regex.replace("(?<", "(?P<"))
    options = {}
    for line in lines:
        hit = rx.search(line)
        if hit:
            options[hit.group("value")] = hit.group("text")
    assert options == {ops.hq["id"]: "HQ", ops.branch["id"]: "Branch", ops.broke["id"]: "Broke"}, (options, lines)


def loaded_rules(prom: PrometheusProcess) -> list[dict]:
    rules = [r for g in prom.api("/api/v1/rules")["groups"] for r in g["rules"]]
    assert rules, "Prometheus loaded no rules"
    return rules


def test_prometheus_loaded_every_alert_rule(stack) -> None:
    _, prom = stack
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    found = int(re.search(r"(\d+) rules found", out.stdout).group(1))
    deadline = time.monotonic() + 10
    while True:
        rules = loaded_rules(prom)
        if all(r.get("health") == "ok" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == found
    assert all(r["type"] == "alerting" for r in rules)
    bad = {r["name"]: (r.get("health"), r.get("lastError")) for r in rules if r.get("health") != "ok"}
    assert not bad, bad
    for r in rules:
        a = r["annotations"]
        assert a.get("summary") and len(a.get("description", "")) > 80, f"{r['name']} needs operator guidance"
        assert r["labels"].get("severity") in ("warning", "critical"), r["name"]


# groups whose series a lone edge does not export: evaluated as written only (their firing is tested
# with promtool on synthetic series, tests/cluster/test_cluster_alerts.py)
NOT_ON_A_LONE_EDGE = {"sipedge-cluster"}


def test_every_alert_expression_evaluates_with_series(stack) -> None:
    _, prom = stack
    failures = []
    lone = {r["name"] for g in prom.api("/api/v1/rules")["groups"] if g["name"] in NOT_ON_A_LONE_EDGE
            for r in g["rules"]}
    assert lone, "the sipedge-cluster group is loaded"
    for r in loaded_rules(prom):
        expr = r["query"]
        try:
            prom.query(expr)                      # as written: may be empty, must not error
            if r["name"] in lone:
                continue
            probe = with_bool(expr)
            if not prom.query(probe)["result"]:
                failures.append(f"{r['name']}: no series for {probe}")
        except Exception as exc:
            failures.append(f"{r['name']}: {exc}")
    assert not failures, "alert expressions failing:\n" + "\n".join(failures)


def test_alerts_the_traffic_provokes_are_active(stack) -> None:
    _, prom = stack
    deadline = time.monotonic() + 10
    while True:
        alerts = prom.api("/api/v1/alerts")["alerts"]
        missing = [name for name, labels in EXPECTED_ACTIVE.items()
                   if not any(a["labels"]["alertname"] == name
                              and all(a["labels"].get(k) == v for k, v in labels.items()) for a in alerts)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, (missing, alerts)
    names = {a["labels"]["alertname"] for a in alerts}
    assert "SipedgeDown" not in names and "SipedgeInternalErrors" not in names
    # the annotation template that queries the master balance rendered a number
    failing = next(a for a in alerts if a["labels"]["alertname"] == "SipedgeCreditLowAutoRechargeFailing")
    assert "(0.5)" in failing["annotations"]["description"], failing["annotations"]["description"]


def test_shipped_prometheus_config_scrapes_the_edge_and_loads_the_rules(stack, tmp_path) -> None:
    """deploy/prometheus/prometheus.yml as a newcomer uses it (next to alerts.yml), only the target changed."""
    ops, _ = stack
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text())
    config = EXAMPLE_CONFIG.read_text()
    assert "127.0.0.1:8080" in config
    prom = PrometheusProcess(tmp_path / "run", f"127.0.0.1:{ops.edge.api_port}")
    prom.config = tmp_path / "prometheus.yml"
    prom.config.write_text(config.replace("127.0.0.1:8080", prom.target))
    with prom.start():
        # its scrape interval is 15 s: check the target it will scrape (the scrape itself is proven above)
        deadline = time.monotonic() + 10
        while not (targets := prom.api("/api/v1/targets")["activeTargets"]) and time.monotonic() < deadline:
            time.sleep(0.1)                      # service discovery runs once the server is ready
        assert [(t["labels"]["job"], t["scrapeUrl"]) for t in targets] == \
            [("sipedge", f"http://{prom.target}/metrics")], targets
        assert len(loaded_rules(prom)) == len(re.findall(r"^\s+- alert:", ALERTS.read_text(), re.M))
