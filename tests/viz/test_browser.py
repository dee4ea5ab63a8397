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
from pathlib import Path

import pytest


from tests.helpers import SCRIPT, make_run, serving

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
    with serving(run) as srv:
        yield f"http://127.0.0.1:{srv.server_address[1]}"


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


# -- feature dashboards on a real run (tiny model + tiny SAEs + this package's writers; see test_dashboards.py) --
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from tests.helpers import real_run

    run = real_run()
    with serving(run["root"]) as srv:
        yield run, f"http://127.0.0.1:{srv.server_address[1]}"


def _wait(d, cond, what: str = "") -> None:
    """Wait (10 s at most) until cond(driver): a click on a link or a form submit navigates asynchronously."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, 10).until(cond, what)


def _visible(d, css: str) -> None:
    from selenium.webdriver.common.by import By

    els = d.find_elements(By.CSS_SELECTOR, css)
    assert els, f"{css} is missing on {d.current_url}"
    assert all(e.is_displayed() for e in els), css
    assert any(e.size["width"] > 0 and e.size["height"] > 0 for e in els), css  # (a histogram's empty bins are flat)


def test_every_dashboard_panel_renders(browser, real):
    from selenium.webdriver.common.by import By

    from tests.helpers import SAE_NAME, fired_latent, steered_latent

    run, base = real
    d = browser
    for latent in (fired_latent(run), steered_latent(run)):
        d.get(f"{base}/feature/{SAE_NAME}/{latent}")
        assert d.title == f"Feature {SAE_NAME} #{latent}"
        for css in ("#logit-lens", "#logit-lens code.lens-token", "#density", "#density svg.histogram rect", "#icl-prompts",
                    "#icl-prompts svg.masses", "#icl-prompts .icl-task .tok", "#neighbours", "#neighbours a", "div.ex"):  # fmt: skip
            _visible(d, css)
        assert d.find_elements(By.TAG_NAME, "script") == []
    _visible(d, "#steering svg.steering rect")  # the heatmap measured this one
    _shot(d, "feature_dashboard")
    here = d.title
    d.find_element(By.CSS_SELECTOR, "#neighbours a").click()  # a neighbour is a link to its own page
    _wait(d, lambda d: d.title != here, "neighbour link")
    assert d.title.startswith(f"Feature {SAE_NAME} #")

    d.get(f"{base}/task/antonyms")
    for css in ("#task-weights svg.weights rect", "#tvc-curves svg.tvc-l0 polyline", "#tvc-curves svg.tvc-loss polyline"):
        _visible(d, css)
    _shot(d, "task_dashboard")

    d.get(f"{base}/circuit/0")
    for css in ("#circuit-graph", "#circuit-graph a.node", "#faithfulness-curve svg.faithfulness polyline", "#circuit-filter select"):
        _visible(d, css)
    _shot(d, "circuit_dashboard")

    d.get(f"{base}/features")  # search by SAE and feature id
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.CSS_SELECTOR, "#search select[name=sae]")).select_by_visible_text(SAE_NAME)
    d.find_element(By.CSS_SELECTOR, "#search input[name=latent]").send_keys("5")
    d.find_element(By.CSS_SELECTOR, "#search button").click()
    _wait(d, lambda d: d.title == f"Feature {SAE_NAME} #5", "search")

    d.get(f"{base}/sae/{SAE_NAME}")  # the run's features, sorted by a clicked column
    d.find_element(By.PARTIAL_LINK_TEXT, "max act").click()
    _wait(d, lambda d: "sort=max_act" in d.current_url, "sort")
    col = [h.text for h in d.find_elements(By.CSS_SELECTOR, "#feature-list th")].index(next(h.text for h in d.find_elements(By.CSS_SELECTOR, "#feature-list th") if h.text.startswith("max act")))
    vals = [float(r.find_elements(By.TAG_NAME, "td")[col].text) for r in d.find_elements(By.CSS_SELECTOR, "#feature-list tbody tr")]
    assert len(vals) == run["sae"].d_sae and (vals == sorted(vals) or vals == sorted(vals, reverse=True))
    d.find_element(By.PARTIAL_LINK_TEXT, "max act").click()  # and the other way round
    _wait(d, lambda d: "order=asc" in d.current_url, "sort the other way")
    again = [float(r.find_elements(By.TAG_NAME, "td")[col].text) for r in d.find_elements(By.CSS_SELECTOR, "#feature-list tbody tr")]
    assert again == vals[::-1] or sorted(again) == sorted(vals) and again != vals
    _no_alert(d)


def test_logit_lens_tokens_equal_direct_computation(browser, real):
    from selenium.webdriver.common.by import By

    from tests.helpers import SAE_NAME, direct_lens

    run, base = real
    lm, sae = run["lm"], run["sae"]
    logits = direct_lens(lm, sae)  # (norm(W_dec) - norm(0)) @ W_U^T, all at once
    for latent in (0, 7, sae.d_sae - 1):
        browser.get(f"{base}/feature/{SAE_NAME}/{latent}")
        tables = browser.find_elements(By.CSS_SELECTOR, "#logit-lens table")
        shown = [[c.get_attribute("textContent") for c in t.find_elements(By.CSS_SELECTOR, "code.lens-token")] for t in tables]
        values = [[float(tr.find_elements(By.TAG_NAME, "td")[1].text) for tr in t.find_elements(By.CSS_SELECTOR, "tbody tr")] for t in tables]
        top, bot = logits[latent].topk(6), (-logits[latent]).topk(6)
        def text(i: int) -> str:
            return lm.tokenizer.decode([i]).replace("\n", "⏎") or f"[id {i}]"

        assert shown[0] == [text(i) for i in top.indices.tolist()]
        assert shown[1] == [text(i) for i in bot.indices.tolist()]
        assert values[0] == pytest.approx(top.values.tolist(), abs=1e-3) and values[1] == pytest.approx((-bot.values).tolist(), abs=1e-3)


def test_circuit_node_links_open_their_feature_pages(browser, real):
    import json

    from selenium.webdriver.common.by import By

    run, base = real
    graph = json.loads((run["root"] / "circuits" / "antonyms" / "graph.json").read_text())
    expected = {str(n["id"]): (n["key"].replace(".", "_"), n["feature"]) for n in graph["nodes"] if n["feature"] != "error"}
    d = browser
    d.get(f"{base}/circuit/0")
    n = len(d.find_elements(By.CSS_SELECTOR, "#circuit-graph a.node"))
    assert n == len(expected) and n > 0
    for i in range(min(n, 6)):
        node = d.find_elements(By.CSS_SELECTOR, "#circuit-graph a.node")[i]
        sae, latent = expected[node.get_attribute("data-node")]
        hover = node.find_element(By.TAG_NAME, "title").get_attribute("textContent")
        assert "token type:" in hover and "effect:" in hover
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", node)
        node.find_element(By.TAG_NAME, "circle").click()
        _wait(d, lambda d: d.title.startswith("Feature"), "node link")
        assert d.title == f"Feature {sae} #{latent}", (i, d.title)
        d.back()
        _wait(d, lambda d: d.title.startswith("Circuit"), "back to the circuit")
    d.get(f"{base}/circuit/0?type=arrow")  # the filters are a plain GET form
    shown = d.find_elements(By.CSS_SELECTOR, "#circuit-graph a.node")
    assert 0 < len(shown) <= n and all("@arrow" in a.find_element(By.TAG_NAME, "title").get_attribute("textContent") for a in shown)


def test_markup_in_a_token_and_a_task_name_stays_text(browser, real):
    from selenium.webdriver.common.by import By

    from tests.helpers import EVIL_TASK, MARKUP, SAE_NAME, fired_latent

    run, base = real
    d = browser
    d.get(f"{base}/feature/{SAE_NAME}/{fired_latent(run)}")
    toks = [s.get_attribute("textContent") for s in d.find_elements(By.CSS_SELECTOR, "#icl-prompts .tok")]
    assert any(t.strip() == MARKUP for t in toks)  # the token, shown as text
    assert EVIL_TASK in d.find_element(By.ID, "icl-prompts").text  # the task name, shown as text
    main = d.find_element(By.TAG_NAME, "main")
    assert main.find_elements(By.TAG_NAME, "b") == [] or all(b.text != "x" for b in main.find_elements(By.TAG_NAME, "b"))
    assert d.find_elements(By.CSS_SELECTOR, "img[src=x]") == [] and d.find_elements(By.TAG_NAME, "script") == []
    _no_alert(d)
    d.get(f"{base}/tasks")
    d.find_element(By.LINK_TEXT, EVIL_TASK).click()
    _wait(d, lambda d: d.title.startswith("Task"), "task link")
    assert d.title == f"Task {EVIL_TASK}" and d.find_elements(By.CSS_SELECTOR, "img[src=x]") == []
    _no_alert(d)
