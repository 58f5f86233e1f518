"""The TOML config and the ``sipedge`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[2]


def sipedge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid() -> None:
    cfg = load(ROOT / "sipedge.toml")
    assert cfg.sip.domain == "sip.edge.test" and cfg.carriers[0].uri == "sip:127.0.0.2:5080"
    assert cfg.inbound.trusted == ["127.0.0.2/32"]


@pytest.mark.parametrize("text, key", [
    ("[sip]\nbogus = 1\n", "sip.bogus"),
    ("colour = 'red'\n", "colour"),
    ("[sip]\nlisten = ['sctp:127.0.0.1:5060']\n", "sip.listen[0]"),
    ("[media]\nports = [20001, 20010]\n", "media.ports"),
    ("[media]\nports = [1, 'x']\n", "media.ports[1]"),
    ("[api]\nlisten = 'localhost'\n", "api.listen"),
    ("[inbound]\ntrusted = ['10.0.0.0/33']\n", "inbound.trusted[0]"),
    ("[[carriers]]\nuri = 'http://x'\n", "carriers[0].uri"),
    ("[[carriers]]\npriority = 1\n", "carriers[0]"),
    ("[sip\n", "not valid TOML"),
])
def test_broken_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert key in str(err.value)


def test_env_token_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[api]\ntoken = 'from-file'\n")
    assert load(path).api.token == "from-file"
    monkeypatch.setenv("SIPEDGE_ADMIN_TOKEN", "from-env")
    assert load(path).api.token == "from-env"


def test_check_command(tmp_path: Path) -> None:
    ok = sipedge("check", "--config", str(ROOT / "sipedge.toml"))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = sipedge("check", "--config", str(write(tmp_path, "[sip]\nbogus = 1\n")))
    assert bad.returncode == 2 and "sip.bogus: unknown key" in bad.stderr
    missing = sipedge("check", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "No such file" in missing.stderr


def test_serve_refuses_a_broken_config(tmp_path: Path) -> None:
    r = sipedge("serve", "--config", str(write(tmp_path, "[media]\nports = [3, 2]\n")), "--data", str(tmp_path / "d"))
    assert r.returncode == 2 and "media.ports" in r.stderr
    assert not (tmp_path / "d").exists()  # nothing half-created


def test_version_and_help() -> None:
    assert sipedge("version").stdout.startswith("sipedge ")
    assert "serve" in sipedge("--help").stdout


def test_purge_cdrs_command(tmp_path: Path) -> None:
    """Old CDRs go, recent ones stay (the remedy for a store that fills up, docs/operations.md)."""
    import time

    from edge.control import cdrs
    from edge.control.models import Cdr
    from edge.control.store import Store

    store = Store(tmp_path / "d", map_size=16 << 20, durable=False)
    now = time.time()
    for i, age_days in enumerate([40, 35, 2]):
        ended = now - age_days * 86400
        cdr = Cdr(seq=0, call_id=f"c{i}", profile_id="prf_1", direction="outgoing", caller="a", callee="b",
                  started_at=ended - 10, answered_at=None, ended_at=ended, duration=0, status=486,
                  end_reason="rejected")
        store.write(lambda txn, cdr=cdr: cdrs.add(txn, cdr))
    store.close()
    r = sipedge("purge-cdrs", "--data", str(tmp_path / "d"), "--older-than-days", "30")
    assert r.returncode == 0 and "purged 2 CDRs" in r.stdout, r.stderr
    store = Store(tmp_path / "d", map_size=16 << 20)
    assert [c.call_id for c in cdrs.page(store, "prf_1")] == ["c2"]
    store.close()
    assert sipedge("purge-cdrs", "--data", str(tmp_path / "none"), "--older-than-days", "1").returncode == 2


def test_node_section_and_what_a_reload_applies(tmp_path: Path) -> None:
    from edge.config import restart_only_changes

    old = load(write(tmp_path, "[sip]\nrate_limit = 10\n"))
    assert old.node.drain_timeout == 600 and old.node.log_level is None
    new = load(write(tmp_path, "[node]\ndrain_timeout = 5\nlog_level = 'debug'\n[sip]\nrate_limit = 20\n"
                               "domain = 'other.test'\n[media]\nports = [30000, 30099]\n"
                               "[[carriers]]\nuri = 'sip:192.0.2.1'\n[inbound]\ntrusted = ['192.0.2.1/32']\n"))
    assert restart_only_changes(old, new) == ["media.ports", "sip.domain"]
    with pytest.raises(ConfigError, match="node.drain_timeout"):
        load(write(tmp_path, "[node]\ndrain_timeout = -1\n"))


def test_backup_command(tmp_path: Path) -> None:
    """`sipedge backup DIR`: a compacted copy that opens as a store with the same records."""
    from edge.control import cdrs
    from edge.control.models import Cdr
    from edge.control.store import Store

    store = Store(tmp_path / "d", map_size=16 << 20, durable=False)
    cdr = Cdr(seq=0, call_id="c1", profile_id="prf_1", direction="outgoing", caller="a", callee="b",
              started_at=1.0, answered_at=None, ended_at=2.0, duration=0, status=486, end_reason="rejected")
    store.write(lambda txn: cdrs.add(txn, cdr))
    store.close()
    r = sipedge("backup", str(tmp_path / "bk"), "--data", str(tmp_path / "d"))
    assert r.returncode == 0 and "backed up" in r.stdout, r.stderr
    copy = Store(tmp_path / "bk", map_size=16 << 20)
    assert [c.call_id for c in cdrs.page(copy, "prf_1")] == ["c1"]
    copy.close()
    again = sipedge("backup", str(tmp_path / "bk"), "--data", str(tmp_path / "d"))
    assert again.returncode == 1 and "not empty" in again.stderr
