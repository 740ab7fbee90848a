"""The web viewer in a real headless Chromium: the overlay must be on screen, checked in the screenshot's pixels."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install rwkvseg[serve])")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from serve_support import png, running_server, square_image, write_case  # noqa: E402

from rwkvseg.serve import ServeConfig, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver are not installed")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000")
    for flag in (*flags, "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def upload(driver, model: str, paths: list[Path], done: str) -> None:
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    field = driver.find_element(By.ID, "file")
    field.clear()
    field.send_keys("\n".join(str(p) for p in paths))
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done") == done)


def shot(element) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(int)


def test_viewer_shows_the_2d_overlay_and_3d_planes(browser, test_models, tmp_path):
    image = square_image(shape=(160, 200), box=(40, 120, 30, 150))
    (tmp_path / "polyp.png").write_bytes(png(image))
    (tmp_path / "notes.txt").write_text("not an image")
    files, _ = write_case(tmp_path / "case")
    config = ServeConfig(models=(str(test_models["bright"]), f"ball={test_models['ball']}"))
    with running_server(create_app(config)) as url:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-models"))

        upload(browser, "bright", [tmp_path / "polyp.png"], "2")
        overlay = browser.find_element(By.ID, "overlay2d")
        pixels = shot(overlay)[1:-1, 1:-1]  # inside the 1 px border
        assert pixels.shape[:2] == (160, 200)  # shown at the image's own size
        red = pixels[..., 0] - pixels[..., 1]
        inside, outside = red[50:110, 40:140], np.concatenate([red[:30].ravel(), red[130:].ravel()])
        assert inside.min() > 40 and np.abs(outside).max() < 8  # tinted exactly where the mask is

        upload(browser, "bright", [tmp_path / "notes.txt"], "error")
        assert "not an image" in browser.find_element(By.ID, "status").text

        upload(browser, "ball", files, "3")
        for plane in ("axial", "coronal", "sagittal"):
            pixels = shot(browser.find_element(By.ID, plane))
            green = (pixels[..., 1] - pixels[..., 0] > 40) & (pixels[..., 1] - pixels[..., 2] > 40)
            grey = (np.abs(pixels[..., 0] - pixels[..., 1]) < 3) & (np.abs(pixels[..., 1] - pixels[..., 2]) < 3)
            assert green.sum() > 50 and grey.sum() > 200, plane  # label 2 over the brain, on the busiest slice
        legend = browser.find_element(By.ID, "legend").text
        assert "2" in legend and "WT" in browser.find_element(By.ID, "regions").text
        browser.save_screenshot(str(tmp_path / "viewer.png"))
    assert (tmp_path / "viewer.png").stat().st_size > 1000
