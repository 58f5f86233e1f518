"""The sipedge-cluster alert rules of deploy/prometheus/alerts.yml fire on the series they are meant for.

A lone edge exports no edge_cluster_* series, so tests/ops cannot make these rules fire; promtool's rule
unit tests feed them synthetic series instead (tests/cluster/cluster_alerts_test.yml).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
CASES = Path(__file__).with_name("cluster_alerts_test.yml")


def test_cluster_alerts_fire_on_lost_lease_and_unreachable_engine(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is needed (Debian prometheus; make system-deps)")
    groups = [g for g in yaml.safe_load(ALERTS.read_text())["groups"] if g["name"] == "sipedge-cluster"]
    assert groups and {r["alert"] for r in groups[0]["rules"]} >= {"SipedgeClusterLeaseLost",
                                                                      "SipedgeClusterEngineUnreachable"}
    for rule in groups[0]["rules"]:
        rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(CASES, tmp_path / CASES.name)
    out = subprocess.run(["promtool", "test", "rules", CASES.name], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
