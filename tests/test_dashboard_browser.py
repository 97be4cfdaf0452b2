"""End to end: `ps3d dashboard` serves the app, and real headless Chromium opens every page.

Uses the system Chromium and its chromedriver (Debian packages ``chromium``
and ``chromium-driver``; ``make test`` installs them when missing) through
Selenium; no browser is downloaded. Checks that each page's charts render
(Vega-Lite draws a canvas or an SVG), tables and images appear, and no
exception is shown; saves a screenshot of every page (into
``$PS3D_SCREENSHOTS_DIR`` when set, else the test's temporary directory).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from dashboards import demo_data

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PS3D = Path(sys.executable).with_name("ps3d")
#: url path -> (charts drawn, other elements that must be there)
PAGES = {
    "": (1, ["[data-testid='stDataFrame']"]),  # Overview (the default page)
    "size": (2, ["[data-testid='stDataFrame']"]),
    "shape": (3, ["[data-testid='stDataFrame']"]),
    "composition": (5, []),
    "process": (4, ["[data-testid='stDataFrame']"]),
    "explorer": (0, ["[data-testid='stDataFrame']", "[data-testid='stImage'] img"]),
    "sql": (0, ["[data-testid='stDataFrame']", "[data-testid='stDownloadButton']"]),
}
PAGE_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = demo_data.build(tmp_path_factory.mktemp("browser") / "home", particles=1500, seed=4)
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "dashboard.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(PS3D), "dashboard", "--home", str(home), "--port", str(port)], stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the dashboard did not start:\n{log.read_text()}")
            time.sleep(0.3)
        yield url, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="ps3d-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--window-size=1400,1800",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_rendered(driver, charts: int, selectors: list[str]) -> None:
    """Until the script finished, ``charts`` Vega charts are drawn and each selector matches."""
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    stable = 0
    while time.monotonic() < deadline:
        running = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']")
        drawn = driver.find_elements(By.CSS_SELECTOR, ".vega-embed canvas, .vega-embed svg.marks")
        present = all(driver.find_elements(By.CSS_SELECTOR, s) for s in selectors)
        ready = not running and len(drawn) >= charts and present and driver.find_elements(By.CSS_SELECTOR, "h1")
        stable = stable + 1 if ready else 0
        if stable >= 3:  # three polls in a row: the rerun is over
            return
        time.sleep(0.5)
    raise AssertionError(f"page did not render: {len(drawn)} chart(s) drawn of {charts}, running={bool(running)}, "
                         f"selectors present={present}")  # fmt: skip


def test_every_page_in_headless_chromium(server, browser, tmp_path):
    url, _ = server
    shots = Path(os.environ.get("PS3D_SCREENSHOTS_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    for path, (charts, selectors) in PAGES.items():
        browser.get(f"{url}/{path}")
        wait_rendered(browser, charts, selectors)
        name = path or "overview"
        text = browser.find_element(By.TAG_NAME, "body").text
        assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stException']"), (name, text[:2000])
        assert "Traceback" not in text and "Page not found" not in text, (name, text[:2000])
        assert "Weighting:" in text or name in ("explorer", "sql"), name
        for chart in browser.find_elements(By.CSS_SELECTOR, ".vega-embed"):
            size = chart.size
            assert size["width"] > 100 and size["height"] > 100, (name, size)
        target = shots / f"dashboard-{name}.png"
        assert browser.save_screenshot(str(target)), target
        assert target.stat().st_size > 20_000, target  # a rendered page, not a blank one


def test_the_server_binds_to_localhost_only(server):
    _, port = server
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines() if line.strip()}
    assert addresses == {"127.0.0.1"}, listening
