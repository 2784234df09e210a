#!/usr/bin/env python3
"""docs/drawing-pad.png: `tf-emnist serve saved_models/merged` in headless Chromium, a 4 drawn on its pad.

Needs Debian's chromium and chromium-driver and selenium (the test extra).
Usage: python scripts/make_screenshot.py [--model saved_models/merged] [--output docs/drawing-pad.png]
"""
import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FOUR = [[(175, 40), (80, 175), (215, 175)], [(175, 40), (175, 250)]]  # strokes in canvas pixels (280 x 280)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stroke(driver, points, steps: int = 12) -> None:
    """One stroke through `points`, in small moves, as a hand draws it."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "pad")
    actions = ActionChains(driver, duration=10)
    actions.move_to_element_with_offset(canvas, points[0][0] - 140, points[0][1] - 140).click_and_hold()
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        for _ in range(steps):
            actions.move_by_offset(round((xb - xa) / steps), round((yb - ya) / steps))
    actions.release().perform()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "saved_models", "merged"))
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "drawing-pad.png"))
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tf_emnist.cli.main", "-q", "serve", args.model, "--port",
                               str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1000",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)
            for points in FOUR:
                stroke(driver, points)
            WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "prediction").text and d.find_element(
                "id", "prediction").get_attribute("data-version") == d.find_element("id", "pad").get_attribute(
                "data-version"))
            driver.save_screenshot(args.output)
            print(f"{args.output}: answered {driver.find_element('id', 'prediction').text!r}; "
                  f"{driver.find_element('class name', 'model').text}")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
