"""The chat page in a real headless browser (Debian's chromium + chromedriver, selenium)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
        reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def browser():
    selenium = pytest.importorskip("selenium.webdriver")
    options = selenium.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = selenium.Chrome(service=selenium.ChromeService(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def bot_texts(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        e.text.split("\n")[0]
        for e in driver.find_elements(By.CSS_SELECTOR, ".msg.bot:not(.pending)")
    ]


def say(driver, text: str, replies: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "message")
    box.send_keys(text, Keys.ENTER)
    WebDriverWait(driver, 30).until(lambda d: len(bot_texts(d)) == replies)


def open_page(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element("id", "status").text.startswith("model: tiny")
    )


def test_two_messages_two_replies_then_reset(browser, plain_url):
    from selenium.webdriver.common.by import By

    open_page(browser, plain_url)
    # Greedy, so the replies are the ones the tiny model learnt.
    browser.execute_script("document.getElementById('temperature').value = 0")
    say(browser, "Do you like tea?", 1)
    assert bot_texts(browser) == ["Yes, I like green tea."]
    say(browser, "Me too!", 2)
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")]
    assert users == ["Do you like tea?", "Me too!"]
    assert len(bot_texts(browser)) == 2 and all(bot_texts(browser))
    # The conversation survives a reload...
    browser.refresh()
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == users
    # ...and reset empties it.
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    say(browser, "Hello", 1)
    assert bot_texts(browser) == ["Hi, how are you?"]  # a fresh conversation


def test_mmi_candidates_and_scores_on_request(browser, mmi_url):
    from selenium.webdriver.common.by import By

    open_page(browser, mmi_url)
    assert "(MMI)" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "show-candidates").click()
    count = browser.find_element(By.ID, "candidates")
    count.clear()
    count.send_keys("4")
    say(browser, "Where do you live?", 1)
    items = browser.find_elements(By.CSS_SELECTOR, ".msg.bot .candidates li")
    assert 1 <= len(items) <= 4
    chosen = browser.find_elements(By.CSS_SELECTOR, ".msg.bot .candidates li.chosen")
    assert len(chosen) == 1
    assert chosen[0].text.split("  ", 1)[1] in (bot_texts(browser)[0], "(empty)")
    float(items[0].text.split()[0])  # a score first


def test_the_page_sends_the_api_key(browser, trained):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.serving.server import running

    with running(trained[0], api_key="s3cret") as url:
        open_page(browser, url)
        browser.execute_script("document.getElementById('temperature').value = 0")
        box = browser.find_element(By.ID, "message")
        box.send_keys("Hello\n")
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".error"))
        error = browser.find_element(By.CSS_SELECTOR, ".error").text
        assert error == "error: missing or wrong API key (send Authorization: Bearer KEY)"
        browser.find_element(By.ID, "api-key").send_keys("s3cret")
        say(browser, "Hello", 1)
        assert bot_texts(browser) == ["Hi, how are you?"]
