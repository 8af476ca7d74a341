"""Screenshot of `d3s2 app` with a pipeline folder (default: the bundled demo pipeline) for the README.

    python scripts/app_screenshot.py --image examples/horse_lusitano.png --out docs/app.png

Starts the app on a free localhost port, uploads the image in headless Debian Chromium (Selenium), generates,
waits until the 3D viewer has drawn the mesh and saves the page. Needs the `[app]` extra, selenium, chromium and
chromium-driver (`make test` installs them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

# Flags that work on these machines (see tests/app/test_browser.py): root, no GPU, closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_css(driver, css: str, timeout: float):
    WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    return driver.find_elements(By.CSS_SELECTOR, css)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", required=True, help="input image (PNG with alpha)")
    ap.add_argument("--out", required=True, help="screenshot PNG to write")
    ap.add_argument("--weights", default=None, help="pipeline folder (default: the bundled demo pipeline)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the result")
    args = ap.parse_args()

    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="d3s2-app-shot-"))
    cmd = [sys.executable, "-m", "d3s2.cli", "app", "--port", str(port), "--out", str(work / "out"), "--device", "cpu"]
    if args.weights:
        cmd += ["--weights", args.weights]
    server = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile'}"]:
        opts.add_argument(flag)
    driver = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start (exit code {server.poll()})")
            time.sleep(0.5)
        service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
        driver = webdriver.Chrome(options=opts, service=service)
        driver.get(url)
        _wait_css(driver, "#image-upload input[type=file]", 60)[0].send_keys(str(Path(args.image).resolve()))
        print("image uploaded, waiting for the preview", flush=True)
        _wait_css(driver, "#mask-preview img", 120)
        print("preview shown, generating", flush=True)
        driver.find_element(By.CSS_SELECTOR, "#generate-button").click()
        _wait_css(driver, "#result-viewer [data-testid=model3d-download-link]", args.timeout)
        time.sleep(5)  # the viewer loads and frames the mesh
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp.png")
        driver.save_screenshot(str(tmp))
        os.replace(tmp, out)
        print(f"wrote {out}")
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
