"""Errors of the control API that no black-box test can provoke at will: a bug (500, always
logged with its traceback) and a store that cannot write (507 / 503, logged by the store)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from admin_api.app import create_app
from edge.control import accounts
from edge.control.errors import StoreFull, StoreUnavailable
from edge.control.store import Store

TOKEN = "t0ken"
# Building the app in-process shows Litestar 2.x's deprecation of an unmarked ``data`` body on
# some handlers (routes.py; the served edge shows it nowhere): not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    store = Store(tmp_path, map_size=16 << 20, durable=False)
    app, _ = create_app(store, TOKEN)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c
    store.close()


def test_a_bug_is_a_500_with_a_log_line(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(accounts, "create", boom)
    with caplog.at_level(logging.ERROR, logger="sipedge.api"):
        r = client.post("/v1/accounts", json={"name": "A", "admin": "a"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    assert r.json() == {"type": "urn:sipedge:error:internal_error", "title": "Internal error", "status": 500,
                        "detail": "internal error (logged)", "code": "internal_error", "instance": "/v1/accounts"}
    [rec] = [x for x in caplog.records if x.name == "sipedge.api"]
    assert rec.exc_info is not None and rec.path == "/v1/accounts" and rec.method == "POST"


@pytest.mark.parametrize("exc, status", [(StoreFull("the store is full: raise storage.map_size_mb"), 507),
                                         (StoreUnavailable("the store cannot write (Error): I/O"), 503)])
def test_a_store_that_cannot_write(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture, exc: Exception, status: int) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(accounts, "create", refuse)
    with caplog.at_level(logging.INFO):
        r = client.post("/v1/accounts", json={"name": "A", "admin": "a"})
    body = r.json()
    assert r.status_code == status and body["status"] == status and body["detail"] == str(exc)
    assert body["code"] == ("store_full" if status == 507 else "store_unavailable")
    assert not [x for x in caplog.records if x.name == "sipedge.api"]   # the store logs it, once per episode
    assert client.get("/healthz").status_code == 200
