"""``sipedge serve --demo``: what ``make run`` does, as a real process."""

from __future__ import annotations

import re

import httpx
from edgeproc import TOKEN, EdgeProcess


def test_demo_is_provisioned_and_printed(tmp_path) -> None:
    with EdgeProcess(tmp_path).start("--demo") as edge:
        out = edge.log.read_text()
        user = re.search(r"SIP username\s+(\d{12})", out).group(1)
        password = re.search(r"SIP password\s+(\S+)", out).group(1)
        assert "SIP registrar sip.edge.test" in out and f"token: {TOKEN}" in out
        assert "+17606604690" in out
        with edge.client() as api:
            prof_id = re.search(r"/v1/profiles/(prf_\w+)", out).group(1)
            prof = api.get(f"/v1/profiles/{prof_id}").json()
            assert prof["sip_username"] == user and "sip_password" not in prof
            assert api.get(f"/v1/profiles/{prof_id}/credentials").json()["sip_password"] == password
            assert prof["numbers"] == ["+14155550100"] and float(prof["balance"]) == 20
            assert api.get("/v1/rates/lookup", params={"number": "+14155550100"}).json()["prefix"] == "1"
    # a restart on the same store prints the same demo and provisions nothing new
    again = EdgeProcess(tmp_path)  # same data directory, fresh ports
    with again.start("--demo"):
        assert again.log.read_text().count(f"SIP password  {password}") == 2
        assert again.log.read_text().count("demo provisioned now") == 1


def test_generated_token_when_config_has_none(tmp_path) -> None:
    edge = EdgeProcess(tmp_path)
    edge.config.write_text(edge.config.read_text().replace(f'token = "{TOKEN}"', 'token = ""'))
    with edge.start():
        token = (edge.data / "admin_token").read_text().strip()
        assert len(token) >= 24 and oct((edge.data / "admin_token").stat().st_mode & 0o777) == "0o600"
        assert httpx.get(edge.base + "/v1/bundle-exclusions",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(edge.base + "/v1/bundle-exclusions", headers={"Authorization": "Bearer x"}).status_code == 401
