"""Refresh the README's screenshot of the playground (docs/playground.png).

    loragate serve &                        # the demo, no keys
    python scripts/playground_screenshot.py --out docs/playground.png

Drives the OS's headless Chromium through Selenium and Debian's chromedriver (as
tests/test_playground.py does): opens the page, sends one message to every model and waits until
every column has finished, then lets the adapter table refresh once before the shot.
"""
from __future__ import annotations

import argparse
import shutil
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default="", help="API key, if the server has keys (an admin key shows the table)")
    ap.add_argument("--message", default="Hello, how are you?")
    ap.add_argument("--out", default="docs/playground.png")
    ap.add_argument("--size", default="1400,900")
    args = ap.parse_args()

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={args.size}", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(args.url + "/playground/static/logo.svg")
        driver.execute_script("sessionStorage.setItem('loragate.apiKey', arguments[0])", args.key)
        driver.get(args.url + "/")
        wait = WebDriverWait(driver, 120, poll_frequency=0.1)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model-list input"))
        driver.find_element(By.ID, "select-all").click()
        driver.find_element(By.ID, "prompt").send_keys(args.message)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: (cs := d.find_elements(By.CSS_SELECTOR, "#columns .column"))
                   and all(c.get_attribute("data-state") in ("done", "error") for c in cs))
        time.sleep(3.5)  # one refresh of the adapter table, so "requests served" counts this message
        driver.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
