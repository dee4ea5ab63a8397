"""End to end in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

The viewer serves a run made on a tiny model; the browser clicks task -> feature -> its examples ->
circuit -> a node back to its feature, checks what each page shows, that a corpus example holding
<script> is shown as text (no script element, no alert), and that '../' requests are refused.
`make test` installs chromium first (see the Makefile); without it these tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from icl_circuits.viewer import make_server

from .test_viewer import SCRIPT, make_run

CHROMIUM = os.environ.get("ICL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ICL_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000"]  # fmt: skip


def _why_not() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            return f"{path} is missing: install Debian's chromium and chromium-driver (make test does: apt-get install -y chromium chromium-driver)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("browser_run"))
    srv = make_server(run, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download anything
    profile = tempfile.mkdtemp(prefix="icl-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(f)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text


def _shot(driver, name: str) -> None:
    """Save a screenshot when ICL_VIEWER_SCREENSHOTS names a folder (used for the README's pictures)."""
    folder = os.environ.get("ICL_VIEWER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_click_through_task_feature_examples_circuit(browser, base):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(base + "/")
    assert d.title == "icl-circuits viewer"
    _shot(d, "index")
    d.find_element(By.LINK_TEXT, "antonyms").click()
    assert d.title == "Task antonyms"
    cells = [td.text for td in d.find_elements(By.CSS_SELECTOR, "table td")]
    assert "resid_0 #0" in cells and "resid_0 #3" in cells and "0.42" in cells  # cleaned features + steering effect
    _shot(d, "task")

    d.find_element(By.LINK_TEXT, "resid_0 #0").click()
    assert d.title == "Feature resid_0 #0"
    examples = d.find_elements(By.CSS_SELECTOR, "div.ex")
    assert examples, "no examples on the feature page"
    target = examples[0].find_element(By.CSS_SELECTOR, "span.target")
    assert target.text.strip() == SCRIPT  # the <script> token, shown as text
    assert d.find_elements(By.TAG_NAME, "script") == []
    _no_alert(d)
    assert "antonyms" in d.find_element(By.TAG_NAME, "main").text  # listed in the task that uses it
    _shot(d, "feature")

    d.find_element(By.ID, "all-examples").click()
    assert d.title == "Feature resid_0 #0 — all examples"
    assert len(d.find_elements(By.CSS_SELECTOR, "div.ex")) >= len(examples)
    headings = [h.text for h in d.find_elements(By.TAG_NAME, "h3")]
    assert any(h.startswith("Activation in [3, 3.5)") for h in headings) and any(h.startswith("Top") for h in headings)
    d.back()

    d.find_element(By.CSS_SELECTOR, "a[href='/circuit/0']").click()
    assert d.title.startswith("Circuit")
    nodes = d.find_elements(By.CSS_SELECTOR, "svg a.node")
    assert len(nodes) == 2  # the two resid_0 nodes link; attn_1 has no example store here
    node_rows = [tr.text for tr in d.find_elements(By.CSS_SELECTOR, "table tr")]
    assert any("resid.0/0@arrow" in r and "resid_0 #0" in r for r in node_rows)
    _shot(d, "circuit")
    nodes[1].click()  # a node of the graph itself leads to its feature page
    assert d.title in ("Feature resid_0 #0", "Feature resid_0 #3")
    d.back()
    d.find_element(By.LINK_TEXT, "resid_0 #3").click()  # and so does the node table
    assert d.title == "Feature resid_0 #3"

    d.find_element(By.LINK_TEXT, "Plots").click()
    imgs = d.find_elements(By.TAG_NAME, "img")
    assert imgs and d.execute_script("return arguments[0].naturalWidth", imgs[0]) > 0  # the PNG loaded


def test_traversal_refused_in_browser(browser, base):
    from selenium.webdriver.common.by import By

    # Chromium sends '..%2f' as is: the server sees a traversal and refuses it
    for path in ("/files/..%2f..%2f..%2fetc%2fpasswd", "/files/antonyms%2f..%2f..%2f..%2fetc%2fpasswd"):
        browser.get(base + path)
        assert browser.title == "403 Forbidden", path
        assert "root:" not in browser.find_element(By.TAG_NAME, "body").text
    # '../' and '%2e%2e/' are resolved by the browser itself (URL standard): they become /etc/passwd, no such page
    for path in ("/files/../../etc/passwd", "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd"):
        browser.get(base + path)
        assert browser.title in ("404 Not Found", "403 Forbidden"), path
        assert "root:" not in browser.page_source
