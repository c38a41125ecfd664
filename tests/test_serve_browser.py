"""End to end in a real headless Chromium: start ``python -m cellrcnn.serve`` on a free loopback
port, upload a nucleus image through the page, read the count it shows, compare it with the API's
count for the same image, and download the per-cell CSV through the page's button.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``;
no browser is downloaded); skipped with the reason when they are absent.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = ("no Chromium: apt-get install chromium chromium-driver (the browser test needs /usr/bin/chromium "
              "and /usr/bin/chromedriver)")
# skipped before the server starts when there is no browser to drive
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=NO_BROWSER)]
DSB_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bbbc038" / "stage1_train.zip"
DSB_IMAGE = "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1"  # fluorescence, 36 nuclei


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """URL of a ``python -m cellrcnn.serve`` process on a free loopback port (stopped afterwards)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "cellrcnn.serve", "--port", str(port), "--threads", "1"],
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                pytest.fail(f"the server exited: {log.read_text()}")
            time.sleep(0.5)
        else:
            pytest.fail(f"the server did not answer within 120 s: {log.read_text()}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture()
def browser(tmp_path):
    """(Chromium driven by selenium, download folder)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver, downloads
    finally:
        driver.quit()


@pytest.fixture()
def nucleus_image(tmp_path) -> tuple[Path, int | None]:
    """(a real DSB2018 fluorescence field, None) when ../shared/data is present, else (a synthetic
    field of 12 separated nuclei, 12)."""
    if DSB_ZIP.is_file():
        with zipfile.ZipFile(DSB_ZIP) as z:
            (tmp_path / "nuclei.png").write_bytes(z.read(f"{DSB_IMAGE}/images/{DSB_IMAGE}.png"))
        return tmp_path / "nuclei.png", None
    yy, xx = np.mgrid[:256, :256]
    image = np.full((256, 256), 20, np.uint8)
    for cy in (40, 100, 160, 220):
        for cx in (50, 128, 206):
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] = 200
    Image.fromarray(image).save(tmp_path / "nuclei.png")
    return tmp_path / "nuclei.png", 12


def wait_for(condition, timeout: float = 120.0, what: str = ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_drop_an_image_read_the_count_download_the_csv(server, browser, nucleus_image):
    from selenium.webdriver.common.by import By

    driver, downloads = browser
    path, known_count = nucleus_image
    api = httpx.post(f"{server}/segment", files={"file": (path.name, path.read_bytes(), "image/png")}, timeout=120)
    assert api.status_code == 200
    api_count = api.json()["n_objects"]
    if known_count is not None:
        assert api_count == known_count

    driver.get(server)
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#model option"), 30, "the model list")
    assert driver.find_element(By.ID, "model").get_attribute("value") == "auto"  # the server's default
    driver.find_element(By.ID, "files").send_keys(str(path))  # the drop zone's file input
    card = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".result[data-state]"), 120, "the result")[0]
    assert card.get_attribute("data-state") == "done", card.text
    shown = int(card.find_element(By.CSS_SELECTOR, ".count").text)
    assert shown == api_count > 0
    assert len(card.find_elements(By.CSS_SELECTOR, "tbody tr")) == shown
    overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) == 256
    # the histogram is drawn: its canvas holds non-white pixels
    drawn = driver.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;",
        card.find_element(By.CSS_SELECTOR, "canvas.histogram"))
    assert drawn > 500

    card.find_element(By.CSS_SELECTOR, "button[data-format=csv]").click()
    csv = wait_for(lambda: [p for p in downloads.glob("*.csv") if os.path.getsize(p) > 0], 120, "the CSV download")[0]
    assert csv.name == "nuclei.csv"
    table = pd.read_csv(csv)
    assert len(table) == shown and list(table["label"]) == list(range(1, shown + 1))


def disks_png_bytes(rows: int, cols: int) -> bytes:
    """PNG of a 256×256 field with rows × cols separated nuclei of the model's training size."""
    import io

    yy, xx = np.mgrid[:256, :256]
    image = np.full((256, 256), 20, np.uint8)
    for r in range(rows):
        for c in range(cols):
            image[(yy - 40 - 60 * r) ** 2 + (xx - 50 - 78 * c) ** 2 < 81] = 200
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_several_images_dropped_at_once(server, browser):
    """A drop event carrying two images and a text file: a result per image with its known count,
    and the text file's card says why it failed."""
    import base64

    from selenium.webdriver.common.by import By

    driver, _ = browser
    driver.get(server)
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#model option"), 30, "the model list")
    files = [("twelve.png", disks_png_bytes(4, 3), "image/png"), ("six.png", disks_png_bytes(2, 3), "image/png"),
             ("notes.txt", b"not an image", "text/plain")]
    driver.execute_script(
        """const transfer = new DataTransfer();
        for (const [name, b64, type] of arguments[0]) {
          const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
          transfer.items.add(new File([bytes], name, { type }));
        }
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));""",
        [[name, base64.b64encode(data).decode(), kind] for name, data, kind in files])
    cards = wait_for(lambda: (c := driver.find_elements(By.CSS_SELECTOR, ".result[data-state]")) and len(c) == 3 and c,
                     180, "three results")
    by_name = {c.find_element(By.CSS_SELECTOR, ".name").text: c for c in cards}
    assert by_name["twelve.png"].find_element(By.CSS_SELECTOR, ".count").text == "12"
    assert by_name["six.png"].find_element(By.CSS_SELECTOR, ".count").text == "6"
    failed = by_name["notes.txt"]
    assert failed.get_attribute("data-state") == "error"
    assert "not an image" in failed.find_element(By.CSS_SELECTOR, ".status").text
