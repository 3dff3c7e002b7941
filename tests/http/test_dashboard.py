"""The web dashboard at ``/``, driven in a real headless Chromium (Debian's
``chromium`` and ``chromedriver``; .ci/run installs them when missing)
through selenium, against a broker in this process."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import requests

from roost.testing import RoostBroker

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            "chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium cannot be started: {exc.msg}")
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def broker() -> Iterator[RoostBroker]:
    with RoostBroker() as b:
        yield b


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy; DOM elements may
    be replaced by a refresh in between, which counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (NoSuchElementException, StaleElementReferenceException):
            last = None
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def text(driver: Any, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def queue_row(driver: Any, name: str) -> dict[str, str]:
    """The cells of queue ``name``'s row in the queues table, by column."""
    for row in driver.find_elements(By.CSS_SELECTOR, "#queues-table tbody tr"):
        cells = {c.get_attribute("data-col"): c.text for c in row.find_elements(By.TAG_NAME, "td")}
        if cells.get("name") == name:
            return cells
    return {}


def accept_confirm(driver: Any) -> bool:
    try:
        driver.switch_to.alert.accept()
        return True
    except NoAlertPresentException:
        return False


def login(driver: Any, url: str, user: str = "guest", password: str = "guest") -> None:
    driver.get(url)
    wait_for("login form", lambda: driver.find_element(By.ID, "login-user").is_displayed())
    field = driver.find_element(By.ID, "login-user")
    field.clear()
    field.send_keys(user)
    driver.find_element(By.ID, "login-password").send_keys(password)
    driver.find_element(By.ID, "login-submit").click()


def test_static_files_are_served_without_auth(broker: RoostBroker) -> None:
    index = requests.get(broker.http_url + "/", timeout=5)
    assert index.status_code == 200
    assert index.headers["Content-Type"].startswith("text/html")
    assert '<script src="/dashboard/app.js">' in index.text
    js = requests.get(broker.http_url + "/dashboard/app.js", timeout=5)
    assert js.status_code == 200
    assert js.headers["Content-Type"].startswith("text/javascript")
    assert requests.get(broker.http_url + "/dashboard/style.css", timeout=5).ok
    # Nothing outside the directory, and the API still wants auth.
    assert requests.get(broker.http_url + "/dashboard/..%2Fapp.py", timeout=5).status_code == 404
    assert requests.get(broker.http_url + "/dashboard/nope.js", timeout=5).status_code == 404
    plain = requests.get(broker.http_url + "/api/overview", timeout=5)
    assert plain.status_code == 401
    assert plain.headers["WWW-Authenticate"] == 'Basic realm="RabbitMQ Management"'
    # The dashboard's calls get no challenge (no browser login dialog).
    xhr = requests.get(
        broker.http_url + "/api/overview",
        headers={"X-Requested-With": "XMLHttpRequest"},
        auth=("guest", "wrong"),
        timeout=5,
    )
    assert xhr.status_code == 401
    assert xhr.json() == {"error": "not_authorized", "reason": "Login failed"}
    assert "WWW-Authenticate" not in xhr.headers


def test_wrong_password_is_refused(broker: RoostBroker, browser: Any) -> None:
    login(browser, broker.http_url + "/", password="wrong")
    wait_for("login error", lambda: text(browser, "#login-error") == "Login failed")
    assert not browser.find_element(By.ID, "nav").is_displayed()


def test_dashboard_queues_publish_and_purge(
    broker: RoostBroker, browser: Any, tmp_path: Path
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        conn.channel().queue_declare("dash-q")
        login(browser, broker.http_url + "/")

        # Overview: totals and no alarms.
        wait_for("overview", lambda: text(browser, "#total-queues .value") == "1")
        assert text(browser, "#no-alarms") == "No alarms"
        assert text(browser, "#total-connections .value") == "1"
        assert browser.find_element(By.ID, "rates-chart").is_displayed()

        # Queues list, then the queue's page.
        browser.find_element(By.CSS_SELECTOR, '#nav a[data-page="queues"]').click()
        row = wait_for("queue row", lambda: queue_row(browser, "dash-q"))
        assert row["messages"] == "0"
        assert row["consumers"] == "0"
        browser.find_element(By.LINK_TEXT, "dash-q").click()
        wait_for("queue page", lambda: text(browser, "#qd-head h1") == "Queue dash-q")

        # Publish through the form; the depth follows.
        server = broker.server
        assert server is not None
        stats = server.broker.stats
        broker.call(stats.sample)
        payload = browser.find_element(By.ID, "publish-payload")
        payload.clear()
        payload.send_keys("hello dashboard")
        browser.find_element(By.ID, "publish-button").click()
        wait_for("depth 1", lambda: text(browser, "#q-messages .value") == "1")
        assert text(browser, "#status") == ""

        # Peek: the message comes back and stays in the queue.
        browser.find_element(By.ID, "get-button").click()
        wait_for(
            "peeked message", lambda: text(browser, "#get-result pre.payload") == "hello dashboard"
        )

        # Rates are sampled: take one now, and the incoming rate shows.
        broker.call(stats.sample)
        wait_for(
            "incoming rate",
            lambda: text(browser, "#q-rate-publish .value") not in ("", "0.0/s"),
        )
        browser.find_element(By.CSS_SELECTOR, '#nav a[data-page="queues"]').click()
        row = wait_for("queue row with depth", lambda: queue_row(browser, "dash-q"))
        assert row["messages"] == "1"
        assert row["publish_rate"] != "0.0/s"
        browser.save_screenshot(str(tmp_path / "queues.png"))

        # Purge from the list (with its confirmation): the depth goes to 0.
        for button in browser.find_elements(By.CSS_SELECTOR, "#queues-table button.purge"):
            button.click()
            break
        wait_for("confirm dialog", lambda: accept_confirm(browser))
        wait_for("purged", lambda: queue_row(browser, "dash-q").get("messages") == "0")
        assert broker.call(lambda: server.broker.vhosts["/"].queues["dash-q"].message_count) == 0

        browser.find_element(By.CSS_SELECTOR, '#nav a[data-page="overview"]').click()
        wait_for("overview again", lambda: text(browser, "#total-messages .value") == "0")
        browser.save_screenshot(str(tmp_path / "overview.png"))
        if os.environ.get("ROOST_DASHBOARD_SHOTS"):
            for shot in tmp_path.glob("*.png"):
                shutil.copy(shot, os.environ["ROOST_DASHBOARD_SHOTS"])
    finally:
        conn.close()
