"""The account console in a real browser (issue 15): headless Debian Chromium driven by
selenium against a real ``sipedge serve``, with a pjsua2 PBX calling the echo number.

One walk through the seed's steps (sign in, set up a profile with the API's refusals, read
the registration details, credit, auto-recharge, a number and a business account, a live
call and its CDR, the exports, sign-out), then what must be refused: another account's
profile (404), a POST without the CSRF token, repeated wrong passwords (lockout).
With ``SIPEDGE_SCREENSHOTS=docs/console`` the screenshots of docs/console.md are written
there (otherwise into the test's temp dir).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("pjsua2")
webdriver = pytest.importorskip("selenium.webdriver")
if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
    pytest.skip("Debian chromium and chromium-driver are needed (make system-deps)", allow_module_level=True)

from e2e.pjua import PjUA, edge_registrar  # noqa: E402
from edgeproc import EdgeProcess  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ECHO = "+17606604690"
PASSWORD_A = "acme console passphrase"
PASSWORD_B = "globex console passphrase"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcess]:
    with EdgeProcess(tmp_path_factory.mktemp("console")).start() as e:
        yield e


@pytest.fixture(scope="module")
def accounts(edge: EdgeProcess) -> dict[str, Any]:
    api = edge.client()
    a = api.post("/v1/accounts", json={"name": "Acme Ltd", "admin": "acme.admin"}).json()
    b = api.post("/v1/accounts", json={"name": "Globex", "admin": "globex.admin"}).json()
    for acct, pw in ((a, PASSWORD_A), (b, PASSWORD_B)):
        assert api.put(f"/v1/accounts/{acct['id']}/admin-password", json={"password": pw}).status_code == 204
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("SIPEDGE_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def browser() -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, timeout: float = 30.0) -> WebDriverWait:
    """Wait for a page (a condition read across a navigation may see the old page go)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException, NoSuchElementException])


def gone_document(exc: WebDriverException) -> bool:
    """chromedriver reports a node of a replaced document either as stale or as "Node ... does
    not belong to the document" (an inspector error): both mean the page has moved on."""
    return isinstance(exc, StaleElementReferenceException) or "does not belong to the document" in str(exc)


def replaced(old: Any) -> Callable[[Any], bool]:
    """A wait condition: ``old`` (an element of the page before) no longer belongs to the page."""
    def check(_driver: Any) -> bool:
        try:
            old.is_enabled()
        except WebDriverException as exc:
            if gone_document(exc):
                return True
            raise
        return False

    return check


def on_this_page(driver: Any, action: Callable[[], None]) -> None:
    """Run ``action`` on an element found afresh; chromedriver may hand out a node of the document
    being replaced (a stale element, or "Node ... does not belong to the document"): the action
    did not happen then, so wait for the page and find it again."""
    for attempt in range(3):
        try:
            action()
            return
        except WebDriverException as exc:
            if attempt == 2 or not (gone_document(exc) or isinstance(exc, NoSuchElementException)):
                raise
            wait(driver).until(lambda d: d.execute_script("return document.readyState") == "complete")


def fill(driver: Any, field_id: str, value: str) -> None:
    """Type into a field."""
    def type_in() -> None:
        el = driver.find_element(By.ID, field_id)
        el.clear()
        el.send_keys(value)

    on_this_page(driver, type_in)


def click(driver: Any, button_id: str) -> None:
    """Click a submit button or link and wait for the next page to replace this one."""
    old = driver.find_element(By.TAG_NAME, "html")
    on_this_page(driver, lambda: driver.find_element(By.ID, button_id).click())
    wait(driver).until(replaced(old))
    wait(driver).until(lambda d: d.execute_script("return document.readyState") == "complete")


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def sign_in(driver: Any, edge: EdgeProcess, login: str, password: str) -> None:
    driver.get(edge.base + "/console/sign-in")
    fill(driver, "login", login)
    fill(driver, "password", password)
    click(driver, "sign-in")


def shoot(driver: Any, shots: Path, name: str, height: int | None = None) -> None:
    """A full-page screenshot: the window is stretched to the page's height first."""
    full = height or driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, min(max(full + 120, 600), 4000))
    driver.save_screenshot(str(shots / f"{name}.png"))
    driver.set_window_size(width, 1000)


def session_client(driver: Any, edge: EdgeProcess) -> httpx.Client:
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    return httpx.Client(base_url=edge.base, cookies=cookies, timeout=10.0, follow_redirects=False)


def test_the_seed_walk_in_a_browser(edge: EdgeProcess, accounts: dict[str, Any], browser: Any, shots: Path,
                                    tmp_path: Path) -> None:
    a = accounts["a"]
    driver = browser
    driver.get(edge.base + "/console/")
    assert driver.current_url.endswith("/console/sign-in")
    shoot(driver, shots, "sign-in")
    sign_in(driver, edge, "acme.admin", PASSWORD_A)
    wait(driver).until(ec.presence_of_element_located((By.ID, "master-balance")))
    assert driver.current_url.endswith(f"/console/accounts/{a['id']}")
    cookie = next(c for c in driver.get_cookies() if c["name"] == "sipedge_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # master balance: top up (the payment itself is out of scope)
    fill(driver, "topup-amount", "20.00")
    click(driver, "topup")
    wait(driver).until(lambda d: text(d, "master-balance").startswith("20"))

    # set up a SIP profile: name -> Next -> channels (301 refused with the API's message) -> Buy now
    click(driver, "new-profile")
    fill(driver, "profile-name", "Head office")
    click(driver, "next")
    fill(driver, "channels", "301")
    click(driver, "buy-now")
    refusal = text(driver, "profile-error")
    api = edge.client()
    direct = api.post(f"/v1/accounts/{a['id']}/profiles", json={"name": "x", "channels": 301}).json()
    assert "channels_out_of_range" in refusal and direct["detail"] in refusal
    shoot(driver, shots, "new-profile-refused")
    fill(driver, "channels", "10")
    click(driver, "buy-now")
    wait(driver).until(ec.presence_of_element_located((By.ID, "sip-username")))
    profile_id = driver.current_url.rsplit("/", 1)[-1].split("?")[0]
    assert profile_id.startswith("prf_")

    # US bundles: 11 > 10 channels refused (the API's code), then 2
    fill(driver, "bundles", "11")
    click(driver, "save-bundles")
    assert "bundles_exceed_channels" in text(driver, "bundles-error")
    fill(driver, "bundles", "2")
    click(driver, "save-bundles")
    wait(driver).until(lambda d: "bundles" in d.current_url)
    assert api.get(f"/v1/profiles/{profile_id}").json()["us_bundles"] == 2

    # credit beyond the master balance refused, then within it; auto-recharge on
    fill(driver, "credit-amount", "50.00")
    click(driver, "add-credit")
    assert "insufficient_funds" in text(driver, "credit-error")
    fill(driver, "credit-amount", "5.00")
    click(driver, "add-credit")
    wait(driver).until(lambda d: text(d, "profile-balance").startswith("5"))
    driver.find_element(By.ID, "recharge-enabled").click()
    fill(driver, "recharge-amount", "3.00")
    fill(driver, "recharge-min", "1.00")
    click(driver, "save-recharge")
    wait(driver).until(lambda d: "recharge" in d.current_url)
    settings = api.get(f"/v1/profiles/{profile_id}").json()["auto_recharge"]
    assert settings["enabled"] and settings["amount"].startswith("3") and settings["min_balance"].startswith("1")

    # a number (bought on the account page, allocated on the profile page) and business accounts
    driver.get(f"{edge.base}/console/accounts/{a['id']}")
    fill(driver, "buy-number", "+14155550100")
    click(driver, "buy")
    wait(driver).until(lambda d: "+14155550100" in text(d, "numbers"))
    fill(driver, "new-business", "acme.frontdesk")
    click(driver, "create-business")
    wait(driver).until(lambda d: "acme.frontdesk" in text(d, "business"))
    driver.get(f"{edge.base}/console/profiles/{profile_id}")
    click(driver, "allocate-number")
    wait(driver).until(lambda d: "+14155550100" in text(d, "attached-numbers"))
    fill(driver, "attach-business", "acme.admin")
    click(driver, "confirm-business")
    assert "admin_not_attachable" in text(driver, "business-error")
    fill(driver, "attach-business", "acme.frontdesk")
    click(driver, "confirm-business")
    wait(driver).until(lambda d: "acme.frontdesk" in text(d, "attached-business"))

    # the registration details, the password on request only
    assert not driver.find_elements(By.ID, "sip-password")
    click(driver, "reveal")
    username, password = text(driver, "sip-username"), text(driver, "sip-password")
    assert api.get(f"/v1/profiles/{profile_id}/credentials").json()["sip_password"] == password
    assert ECHO in text(driver, "pbx-example")

    # a PBX registers with them and calls the echo number: the live call appears without a reload
    driver.get(f"{edge.base}/console/profiles/{profile_id}")
    marker = driver.find_element(By.ID, "main")
    with PjUA("pbx", log_dir=str(tmp_path)) as pbx:
        assert pbx.register(edge_registrar(edge), username, password, domain="sip.edge.test") == 200
        call = pbx.call(f"sip:{ECHO}@sip.edge.test", tone_hz=440.0)
        call.wait_state("CONFIRMED", 10)
        wait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#live-calls tr.call"))
        assert "1 / 10" in text(driver, "channels-in-use")
        assert ECHO in text(driver, "live-calls")
        shoot(driver, shots, "profile-live-call")
        call.hangup(timeout=10)
        # the list and the count come from one refresh: wait for one that shows the call gone from both
        wait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#live-calls tr.no-calls")
                               and "0 / 10" in text(d, "channels-in-use"))
        assert marker.is_displayed()    # the same page all along: the live part was refreshed in place

        # a second call, ended from the page (the API's hang-up: BYE to both legs, settled as usual)
        second = pbx.call(f"sip:{ECHO}@sip.edge.test", tone_hz=440.0)
        second.wait_state("CONFIRMED", 10)
        wait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#live-calls button.hangup"))
        click(driver, driver.find_element(By.CSS_SELECTOR, "#live-calls button.hangup").get_attribute("id"))
        assert "Hang-up sent" in driver.page_source
        assert second.wait_state("DISCONNECTED", 10) == "DISCONNECTED"
        # the list and the count come from one refresh: wait for one that shows the call gone from both
        wait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#live-calls tr.no-calls")
                               and "0 / 10" in text(d, "channels-in-use"))

    # its CDR, with a time filter and the API's CSV export; the ledger and its CSV
    driver.get(f"{edge.base}/console/profiles/{profile_id}/cdrs")
    wait(driver).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cdrs tr.cdr")) == 2)
    assert ECHO in text(driver, "cdrs")
    reasons = [c["end_reason"] for c in api.get(f"/v1/profiles/{profile_id}/cdrs").json()["items"]]
    assert reasons[0] != reasons[1] and any(r in text(driver, "cdrs") for r in reasons)
    shoot(driver, shots, "cdrs")
    driver.execute_script("document.getElementById('from').value = '2099-01-01T00:00:00'")  # the future: nothing
    click(driver, "filter")
    assert not driver.find_elements(By.CSS_SELECTOR, "#cdrs tr.cdr") and "from=2099" in driver.current_url
    driver.get(f"{edge.base}/console/profiles/{profile_id}/cdrs")
    csv_url = driver.find_element(By.ID, "cdrs-csv").get_attribute("href")
    with session_client(driver, edge) as web:
        got = web.get(csv_url)
        assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
        assert got.text == api.get(f"/v1/profiles/{profile_id}/cdrs", params={"format": "csv"}).text
        assert ECHO in got.text
    driver.get(f"{edge.base}/console/profiles/{profile_id}/ledger")
    assert "allocate_in" in text(driver, "ledger")
    with session_client(driver, edge) as web:
        ledger_csv = web.get(driver.find_element(By.ID, "ledger-csv").get_attribute("href")).text
    assert ledger_csv.startswith("seq,ts,kind,amount,balance_after,ref") and "allocate_in" in ledger_csv

    # the overview, and on a phone
    driver.get(f"{edge.base}/console/accounts/{a['id']}")
    shoot(driver, shots, "account-overview")
    driver.set_window_size(390, 844)
    driver.get(f"{edge.base}/console/profiles/{profile_id}")
    driver.save_screenshot(str(shots / "profile-phone.png"))
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390 + 1, f"the profile page is {width} px wide on a 390 px phone"
    driver.set_window_size(1280, 1000)

    # CSRF: the session's cookie without the form's token is refused, and nothing changes
    with session_client(driver, edge) as web:
        before = api.get(f"/v1/profiles/{profile_id}").json()["balance"]
        refused = web.post(f"/console/profiles/{profile_id}/credit", data={"amount": "1.00"})
        assert refused.status_code == 403 and "csrf_failed" in refused.text
        assert api.get(f"/v1/profiles/{profile_id}").json()["balance"] == before

    # sign-out: the session is gone, server-side too
    old_cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    driver.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait(driver).until(lambda d: d.current_url.endswith("/console/sign-in"))
    with httpx.Client(base_url=edge.base, cookies=old_cookies, follow_redirects=False) as web:
        assert web.get(f"/console/profiles/{profile_id}").headers["location"] == "/console/sign-in"

    # another account's administrator cannot see this profile: 404, as the API answers its key
    sign_in(driver, edge, "globex.admin", PASSWORD_B)
    wait(driver).until(ec.presence_of_element_located((By.ID, "master-balance")))
    driver.get(f"{edge.base}/console/profiles/{profile_id}")
    assert "not found" in text(driver, "error-detail") and "Head office" not in driver.page_source
    with session_client(driver, edge) as web:
        assert web.get(f"/console/profiles/{profile_id}").status_code == 404
        assert web.get(f"/console/accounts/{a['id']}").status_code == 404

    # the operator (the admin token) sees every account
    driver.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait(driver).until(lambda d: d.current_url.endswith("/console/sign-in"))
    fill(driver, "key", "test-admin-token-0123456789")
    click(driver, "sign-in-key")
    wait(driver).until(ec.presence_of_element_located((By.ID, "accounts")))
    listing = text(driver, "accounts")
    assert "Acme Ltd" in listing and "Globex" in listing
    shoot(driver, shots, "operator-accounts")


def test_lockout_after_repeated_failures(edge: EdgeProcess, accounts: dict[str, Any], browser: Any) -> None:
    driver = browser
    for attempt in range(5):
        sign_in(driver, edge, "globex.admin", f"wrong password {attempt}")
        error = text(driver, "sign-in-error")
    assert "too many failed sign-ins" in error
    sign_in(driver, edge, "globex.admin", PASSWORD_B)          # even the right password, while locked
    assert "too many failed sign-ins" in text(driver, "sign-in-error")
    assert driver.current_url.endswith("/console/sign-in")
    # an unknown login is refused with the same words as a wrong password, and is never locked
    for _ in range(6):
        sign_in(driver, edge, "nobody.here", "whatever it is")
    assert text(driver, "sign-in-error") == "Unknown login or wrong password."
    # setting the password through the API lifts the lock
    api = edge.client()
    assert api.put(f"/v1/accounts/{accounts['b']['id']}/admin-password",
                   json={"password": PASSWORD_B}).status_code == 204
    sign_in(driver, edge, "globex.admin", PASSWORD_B)
    wait(driver).until(ec.presence_of_element_located((By.ID, "master-balance")))


def test_sign_in_form_needs_its_own_token(edge: EdgeProcess, accounts: dict[str, Any]) -> None:
    with httpx.Client(base_url=edge.base, follow_redirects=False) as web:
        forged = web.post("/console/sign-in", data={"login": "acme.admin", "password": PASSWORD_A})
        assert forged.status_code == 403 and "sipedge_console=" not in forged.headers.get("set-cookie", "")
        form = web.get("/console/sign-in")
        token = re.search(r'name="sign_in_token" value="([^"]+)"', form.text)
        assert token is not None
        evil = web.post("/console/sign-in", headers={"Origin": "http://evil.example"},
                        data={"sign_in_token": token.group(1), "login": "acme.admin", "password": PASSWORD_A})
        assert evil.status_code == 403
        token = re.search(r'name="sign_in_token" value="([^"]+)"', evil.text)   # each answer has a fresh one
        assert token is not None
        ok = web.post("/console/sign-in", data={"sign_in_token": token.group(1), "login": "acme.admin",
                                                 "password": PASSWORD_A})
        assert ok.status_code == 303 and "HttpOnly" in ok.headers["set-cookie"]
        assert web.get(ok.headers["location"]).status_code == 200


def test_an_unknown_console_path_is_a_page(edge: EdgeProcess) -> None:
    with httpx.Client(base_url=edge.base, follow_redirects=False) as web:
        r = web.get("/console/no/such/page")
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert "There is no such console page." in r.text
        assert web.get("/v1/no-such-thing").headers["content-type"].startswith("application/problem+json")
