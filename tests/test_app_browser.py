"""``diffad app`` in a real browser: Debian's headless Chromium driven by selenium (``make test-browser``).

Starts ``diffad app`` on a free local port over the tiny calibrated fixture, uploads two photos and a broken
file, and asserts on what the page shows: two overlays, two scores with their decisions, the broken file's
error, the histogram of the calibration's held-out normal scores with the expected false-positive rate, and a
threshold change that flips the decisions, the rate and the histogram without another model call. The screenshots
(at the calibrated threshold, then at 0) go to ``$DIFFAD_SCREENSHOT_DIR`` (default: the test's temporary folder).

``make app-screenshot`` runs the same test over a real model: ``$DIFFAD_APP_MODEL`` (a calibrated model folder) and
``$DIFFAD_APP_PHOTOS`` (two photos joined by ``os.pathsep``) replace the fixture and the random photos.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    pytest.importorskip("gradio")
    from tiny_components import saved_tiny_pipeline

    model = os.environ.get("DIFFAD_APP_MODEL") or saved_tiny_pipeline(tmp_path / "model")
    port = _free_port()
    log = (tmp_path / "app.log").open("w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "diffad.cli", "app", "--model", str(model), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"diffad app exited: {(tmp_path / 'app.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("diffad app did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_app_in_headless_chromium(app_url, tmp_path):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    photos = tmp_path / "photos"
    photos.mkdir()
    given = [p for p in os.environ.get("DIFFAD_APP_PHOTOS", "").split(os.pathsep) if p]
    for i in range(2):
        image = Image.open(given[i]).convert("RGB") if given else Image.fromarray(
            np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8))
        image.save(photos / f"part{i}.png")
    (photos / "broken.png").write_text("not an image")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(arg)
    os.environ["SE_OFFLINE"] = "true"  # selenium must never download a browser or a driver
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(app_url)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#uploads input[type=file]"))
        upload.send_keys("\n".join(str(photos / n) for n in ("part0.png", "part1.png", "broken.png")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#uploads a, #uploads .file-name, #uploads td")) > 0)
        time.sleep(1)
        driver.find_element(By.CSS_SELECTOR, "#inspect").click()
        wait.until(lambda d: "files inspected since" in d.find_element(By.CSS_SELECTOR, "#status").text)
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        table = driver.find_element(By.CSS_SELECTOR, "#results").text
        assert "3 files inspected" in status and "Model calls: 2" in status, status
        assert "broken.png" in table and "error" in table and "it is not an image" in table, table
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
        captions = driver.find_element(By.CSS_SELECTOR, "#gallery").text
        assert "part0.png" in captions and "part1.png" in captions, captions
        before = table.count("defect")
        wait.until(lambda d: d.execute_script(  # the overlays drawn, not only their <img> tags (a busy machine lags)
            "return Array.from(document.querySelectorAll('#gallery img')).every(i => i.complete && i.naturalWidth > 0)"))
        # the histogram of the calibration's held-out normal scores, with this session's scores, and its rate
        fpr = driver.find_element(By.CSS_SELECTOR, "#fpr").text
        assert "Expected false-positive rate on normal parts" in fpr and "held-out normal images" in fpr, fpr
        histogram = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#histogram img").get_attribute("src"))
        assert histogram.startswith("data:image/")  # the figure, drawn by the server
        shots = Path(os.environ.get("DIFFAD_SCREENSHOT_DIR", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shots / "diffad_app.png"))  # at the calibrated threshold
        # the threshold's number box: 0 flags every part, with no model call
        box = driver.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("0", Keys.ENTER)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#results").text.count("defect") == 2)
        after = driver.find_element(By.CSS_SELECTOR, "#status").text
        assert "2 FAIL" in after and "Model calls: 2" in after, after
        assert before < 2 or "0 PASS" in after
        # at 0 every held-out normal score is above the threshold: the rate says 100%, the histogram is redrawn
        wait.until(lambda d: "at 0: 100.0%" in d.find_element(By.CSS_SELECTOR, "#fpr").text)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#histogram img").get_attribute("src") != histogram)
        assert driver.save_screenshot(str(shots / "diffad_app_threshold_0.png"))
    finally:
        driver.quit()
