#!/usr/bin/env python3
"""The chat page at `/` in a real headless browser (Debian's chromium + chromium-driver, driven by
selenium): load it, attach a fixture image, ask, wait for the streamed answer, ask a follow-up, save
a screenshot, and check the DOM.

    python tests/serve/chat_page.py --base-url http://127.0.0.1:PORT --model NAME --out DIR
"""
import argparse
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="edgevlm-page-"))
    out.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='edgevlm-chromium-')}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(a.base_url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").text == a.model)
        file_input = driver.find_element(By.ID, "file")
        driver.execute_script("arguments[0].hidden = false", file_input)
        file_input.send_keys(str(ROOT / "tests" / "fixtures" / "images" / "wide.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drop img"))

        def ask(question, n):
            driver.find_element(By.ID, "question").send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant.done")) == n)
            errors = driver.find_elements(By.CSS_SELECTOR, ".error")
            assert not errors, errors[0].text
            answer = driver.find_elements(By.CSS_SELECTOR, ".assistant.done")[-1].text
            assert answer.strip(), "an empty answer"
            return answer

        first = ask("What is in this image?", 1)
        second = ask("And what colour is it?", 2)
        users = driver.find_elements(By.CSS_SELECTOR, ".user")
        assert len(users) == 2, len(users)
        assert users[0].find_elements(By.TAG_NAME, "img"), "the first question shows its image"
        assert not users[1].find_elements(By.TAG_NAME, "img"), "the follow-up has no image of its own"
        assert users[1].text == "And what colour is it?", users[1].text
        shot = out / "chat-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000, "the screenshot is blank"
        print(f"ok chat page: two streamed answers ({len(first)} and {len(second)} characters); screenshot {shot}")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
