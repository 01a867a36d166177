"""End to end: ``streamlit run`` on 127.0.0.1, Debian's headless Chromium driven by selenium, a screenshot kept.

Skipped, with the reason, where Chromium, its driver or selenium is not installed (``.ci/run``
installs them). The screenshot goes to ``$RCC_TEST_ARTIFACTS`` (default: the test's temporary
directory); its path is printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"streamlit exited with {proc.returncode}: {output}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                if resp.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Chromium or chromedriver not installed (Debian packages chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a browser or a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2600"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.mark.integration
def test_dashboard_in_chromium_shows_the_runs_figures(browser, runs_root, small_run, second_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from rcc_compression.visualization.dashboard import streamlit_command

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(streamlit_command(runs_root, port=port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    try:
        _wait_healthy(url, proc)
        browser.get(f"{url}/?run={small_run.name}")
        wait = WebDriverWait(browser, 180, poll_frequency=0.5)
        # counted in the page itself: Streamlit re-renders, so element handles go stale between calls
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll(\"[data-testid='stImageContainer'] img\"))"
            ".filter(i => i.complete && i.naturalWidth > 0).length") >= 6)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert f"\n{small_run.name}\n" in body and "2 of 2 runs" in body  # the run's header; the table (a canvas)
        for title in ("Per-layer compression", "Singular value spectra", "Attention maps", "Cascade steps"):
            assert title in body
        out = Path(os.environ.get("RCC_TEST_ARTIFACTS") or tmp_path)
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"dashboard screenshot: {shot}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
