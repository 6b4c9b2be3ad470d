"""`soe app` in a real browser: headless Chromium (Debian's chromium + chromium-driver, installed by .ci/run)
driven by Selenium loads the page, fills a prompt, presses generate, waits for the video element and takes a
screenshot that must not be blank. Selenium is told the system driver's path, so Selenium Manager never
downloads one; Chromium runs without background networking (the machine has no network)."""
import shutil
from io import BytesIO

import pytest
from PIL import Image, ImageStat
from test_app import served  # noqa: F401 -- the fixture: the app on localhost with the tiny recipe

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1600")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_generate_in_headless_chromium_shows_the_video(served, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = served
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.clear()
    prompt.send_keys("a square bouncing in the browser")
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#generate"))).click()  # Gradio renders it after the prompt on a busy box
    video = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result-video video")))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#status").text.startswith("done:"))
    assert video.get_attribute("src"), "the video element has no source"
    sheet = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result-sheet img")))
    assert sheet.get_attribute("src")
    shot = Image.open(BytesIO(browser.get_screenshot_as_png())).convert("L")
    origin = url.rstrip("/").split("/")[2]
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(u.split("/")[2] == origin for u in fetched if u.startswith("http")), fetched  # offline: no CDN
    assert max(ImageStat.Stat(shot).stddev) > 10 and len(shot.getcolors(1 << 16) or range(1 << 16)) > 20  # not blank
