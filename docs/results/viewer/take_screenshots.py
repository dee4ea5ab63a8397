"""Screenshots of the viewer for the README (headless Chromium via Selenium, as in tests/viz/test_browser.py).

    python docs/results/viewer/take_screenshots.py RUN_DIR [--examples STORE] [--feature SAE/LATENT] [--out docs/results/viewer]

Serves RUN_DIR on a free local port and saves index.png, feature.png (the given latent, or the
circuit's strongest latent with examples), circuit.png (the first circuit) and sae.png.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import urllib.parse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from icl_circuits.viz.viewer import feature_url, make_server

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1100"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--examples", action="append")
    ap.add_argument("--feature", help="SAE/LATENT, e.g. resid_12/123")
    ap.add_argument("--task", help="also shoot this task's page (task vector vs. cleaned features), saved as task.png")
    ap.add_argument("--out", type=Path, default=Path("docs/results/viewer"))
    args = ap.parse_args()

    srv = make_server(args.run_dir, "127.0.0.1", 0, args.examples)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    data = srv.data
    if args.feature:
        sae, latent = args.feature.split("/")
    else:  # the circuit's strongest node that has examples
        nodes = [n for c in data.circuits[:1] for n in c["nodes"] if n["latent"] is not None and data.resolve_sae(n["sae"] or n["site"])]
        n = max(nodes, key=lambda n: abs(n["effect"] or 0))
        sae, latent = data.resolve_sae(n["sae"] or n["site"]), n["latent"]

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for f in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='icl-shots-')}"]:
        opts.add_argument(f)
    d = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        pages = {"index": "/", "feature": feature_url(sae, int(latent)), "sae": f"/sae/{sae}"}
        if data.circuits:
            pages["circuit"] = "/circuit/0"
        if args.task:
            key = next(k for k in data.tasks if k == args.task or k.startswith(args.task))
            pages["task"] = f"/task/{urllib.parse.quote(key)}"
        for name, path in pages.items():
            d.get(base + path)
            d.save_screenshot(str(args.out / f"{name}.png"))
            print(args.out / f"{name}.png", path)
    finally:
        d.quit()
        srv.shutdown()


if __name__ == "__main__":
    main()
