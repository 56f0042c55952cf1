"""Playground page end to end: headless Debian chromium (Selenium + chromedriver) against the run's shared Serve
app (conftest ``serve_app``; its prompts a, b, known and other; the key from the replicas' environment).

The screenshot lands in artifacts/playground.png (CI keeps it as a test artifact).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from serve_helpers import KEY

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def app_url(serve_app):
    return serve_app


def test_page_and_explain_endpoint(app_url):
    page = httpx.get(app_url + "/")
    assert page.status_code == 200 and "paraphrase-ray playground" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    assert httpx.get(app_url + "/prompts/known/explain").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    exp = httpx.get(app_url + "/prompts/known/explain?top_k=2", headers=auth).json()
    assert [p["neighbours"][0]["token_id"] for p in exp["positions"]] == [11, 12, 13]
    missing = httpx.get(app_url + "/prompts/nope/explain", headers=auth)
    assert missing.status_code == 404 and "known" in missing.text


@pytest.mark.skipif(not shutil.which("chromium") or not shutil.which("chromedriver"),
                    reason="chromium and chromedriver are not on PATH: plain pytest does not install them, `make test` "
                           "does (its `browser` step: Debian's chromium + chromium-driver); under CI=true this fails")
def test_browser_compares_prompts_with_zero_shot(app_url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,1100"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(app_url + "/")
        # without the key the page shows the API's 401 as a readable message
        wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)
        key = driver.find_element(By.ID, "apikey")
        key.send_keys(KEY)
        key.send_keys(Keys.TAB)  # change event -> prompts reload with the key
        wait.until(ec.presence_of_element_located((By.ID, "p-known")))
        wait.until(lambda d: "position" in d.find_element(By.ID, "explain").text)
        text = driver.find_element(By.ID, "text")
        # an oversized sentence shows the API's 413/422 as a readable message
        driver.execute_script("document.getElementById('text').value = 'x'.repeat(3000);")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: any(code in d.find_element(By.ID, "error").text for code in ("413", "422")))
        wait.until(lambda d: d.find_element(By.ID, "go").is_enabled())
        text.clear()
        text.send_keys("The bank raised its rates on Tuesday.")
        text.send_keys(Keys.CONTROL, Keys.ENTER)  # keyboard submit
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == 5)
        assert driver.find_element(By.ID, "error").text == ""
        cards = {c.get_attribute("data-prompt"): c for c in driver.find_elements(By.CSS_SELECTOR, "#results .card")}
        assert set(cards) == {"a", "b", "known", "other", "zero-shot"}  # one card per served prompt
        for card in cards.values():
            assert "adequacy" in card.text and "novelty" in card.text
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "playground.png"))
        assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "playground-failure.png"))
        raise
    finally:
        driver.quit()
