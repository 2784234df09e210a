"""The drawing pad in a real browser (headless Chromium): strokes on the canvas are read as characters."""
import json
import os
import shutil

import pytest

from tests.conftest import serving, shipped

pytestmark = pytest.mark.slow  # real processes and servers: the slow tier (make test-slow)

# The shipped int8 TFLite model: ready at once (no XLA to compile).
SHIPPED = shipped("merged-tflite")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install '.[test]'")
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if not driver_path or not (shutil.which("chromium") or shutil.which("google-chrome")):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pad_url():
    pytest.importorskip("starlette", reason="the serve extra is not installed: pip install '.[serve]'")
    with serving(SHIPPED) as (url, _):
        yield url


def draw(driver, points):
    """One stroke through points given in canvas pixels (280 x 280, origin top left)."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "pad")
    actions = ActionChains(driver, duration=10)
    x0, y0 = points[0]
    actions.move_to_element_with_offset(canvas, x0 - 140, y0 - 140).click_and_hold()
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        actions.move_by_offset(xb - xa, yb - ya)
    actions.release().perform()


def answer(driver):
    """The answer for the whole drawing: the page marks which version of the drawing it read."""
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d):
        prediction = d.find_element("id", "prediction")
        return prediction.text and prediction.get_attribute("data-version") == d.find_element(
            "id", "pad").get_attribute("data-version")

    WebDriverWait(driver, 30).until(settled)
    return driver.find_element("id", "prediction").text


def test_strokes_on_the_pad_are_recognised(browser, pad_url, tmp_path):
    import math

    browser.get(pad_url)
    with open(os.path.join(SHIPPED, "assets.extra", "metrics.json")) as f:
        accuracy = json.load(f)["test_accuracy"]
    assert f"{accuracy:.2%} test accuracy" in browser.find_element("class name", "model").text
    draw(browser, [(140, 50 + 9 * i) for i in range(21)])  # a vertical bar
    bar = answer(browser)
    assert bar in {"1", "I", "L"}, bar
    assert len(browser.find_elements("css selector", "#top li")) == 5
    browser.find_element("id", "clear").click()
    assert browser.find_element("id", "prediction").text == ""
    circle = [(140 + 80 * math.sin(t / 20 * 2 * math.pi), 140 - 90 * math.cos(t / 20 * 2 * math.pi))
              for t in range(22)]
    draw(browser, circle)
    assert answer(browser) in {"0", "O", "D", "Q"}
    screenshot = tmp_path / "drawing-pad.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 1000


def test_the_readme_screenshot_is_made_from_what_make_serve_serves(browser, tmp_path):
    """scripts/make_screenshot.py draws a 4 on the pad of `tf-emnist serve saved_models/merged` (make serve)."""
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    shot = tmp_path / "pad.png"
    done = subprocess.run([sys.executable, os.path.join(root, "scripts", "make_screenshot.py"), "--output", shot],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    version = os.path.basename(shipped("merged"))
    assert f"answered '4'; Model: merged v{version} (SavedModel" in done.stdout and shot.stat().st_size > 10_000
