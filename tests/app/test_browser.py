"""`d3s2 app` in headless Chromium (Debian chromium + chromium-driver, driven by Selenium) on localhost.

Uploads a bundled example image, generates with the tiny random pipeline, checks that the 3D viewer draws the
mesh and that the downloads are loadable meshes, then uploads a non-image and expects the error message.
The page screenshot is kept at ``<tmp_path>/app.png``.
"""

from __future__ import annotations

import io
import shutil
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from .conftest import Server, pid_alive, port_open

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                                reason="needs Debian chromium and chromium-driver (`make test` installs them)")
# The flags that work on these machines: no sandbox as root, no GPU, and no background connections (the
# network is closed; Chromium would otherwise retry them at every start).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                           "downloadPath": str(tmp_path / "downloads")})
    yield driver
    driver.quit()


def _wait_for(driver, css: str, timeout: float = 120):  # generous: CI machines are shared
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    return driver.find_elements(By.CSS_SELECTOR, css)


def _drawn_fraction(png: bytes) -> float:
    """Fraction of the central 80 % of an image whose colour differs from its most common one."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    h, w = rgb.shape[:2]
    mid = rgb[h // 10: 9 * h // 10, w // 10: 9 * w // 10].reshape(-1, 3)
    colours, counts = np.unique(mid, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((np.abs(mid - background).max(1) > 12).mean())


def test_app_in_chromium(tiny_weights, tmp_path, browser):
    from selenium.webdriver.common.by import By

    cwd = tmp_path / "cwd"
    server = Server("app", tiny_weights, tmp_path / "out", cwd, ready_path="/")
    try:
        example = str(resources.files("d3s2") / "assets" / "examples" / "horse_lusitano.png")
        browser.get(server.url)
        _wait_for(browser, "#image-upload input[type=file]")[0].send_keys(example)
        _wait_for(browser, "#mask-preview img")  # the conditioner's view and the mask
        browser.find_element(By.CSS_SELECTOR, "#generate-button").click()
        link = _wait_for(browser, "#result-viewer [data-testid=model3d-download-link]")[0]
        # The viewer's canvas mounts after its 3D engine is imported, which can lag the link on a loaded machine.
        canvas = _wait_for(browser, "#result-viewer canvas")[0]
        assert "faces" in _wait_for(browser, "#result-info p")[0].text

        # The viewer's file is a GLB with the mesh.
        glb_url = link.get_attribute("href")
        assert glb_url.endswith("/mesh.glb")
        mesh = trimesh.load(io.BytesIO(httpx.get(glb_url).content), file_type="glb", force="mesh")
        assert len(mesh.faces) > 0 and mesh.is_watertight
        # ... and the viewer draws it: in the middle of the canvas, pixels other than the background colour.
        deadline = time.monotonic() + 30
        while (drawn := _drawn_fraction(canvas.screenshot_as_png)) < 0.01 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert drawn >= 0.01, "the 3D viewer canvas stayed blank"
        browser.save_screenshot(str(tmp_path / "app.png"))
        assert (tmp_path / "app.png").stat().st_size > 10_000

        # The browser download of the viewer's file, and the three download files.
        link.click()
        downloaded = tmp_path / "downloads" / "mesh.glb"
        deadline = time.monotonic() + 20
        while not downloaded.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(trimesh.load(downloaded, force="mesh").faces) == len(mesh.faces)
        files = {a.get_attribute("href").rsplit("/", 1)[-1]: a.get_attribute("href")
                 for a in browser.find_elements(By.CSS_SELECTOR, "#result-files a")}
        assert set(files) == {"mesh.glb", "mesh.obj", "mesh.ply"}
        # Served from the job's folder, under the results cap: Gradio made no copies of them.
        assert all("/out/jobs/" in url for url in [glb_url, *files.values()])
        assert not list((tmp_path / "out" / "gradio").rglob("mesh.*"))
        for name, url in files.items():
            loaded = trimesh.load(io.BytesIO(httpx.get(url).content), file_type=name[-3:], force="mesh")
            assert len(loaded.faces) == len(mesh.faces), name

        # A file that is not an image: the page shows the engine's message.
        fake = tmp_path / "notes.png"
        fake.write_bytes(b"these are notes, not pixels")
        browser.find_element(By.CSS_SELECTOR, "#image-upload button[aria-label='Clear']").click()
        _wait_for(browser, "#image-upload input[type=file]")[0].send_keys(str(fake))
        deadline = time.monotonic() + 60
        while "not an image" not in browser.find_element(By.TAG_NAME, "body").text:
            assert time.monotonic() < deadline, "no error message for a non-image upload"
            time.sleep(0.2)
        assert "Traceback" not in server.log.read_text()  # a user's bad upload is no server fault
    finally:
        children = server.children()
        code = server.stop()
    assert code == 130, server.log.read_text()  # Ctrl-C, as for every d3s2 command
    assert not port_open(server.port)
    assert not [p for p in [server.proc.pid, *children] if pid_alive(p)]
    assert not list(cwd.iterdir())  # Gradio's copies of uploads and results stayed in the output folder
