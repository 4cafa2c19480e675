"""`tunelab ui` launched on 127.0.0.1 and driven in headless Chromium (Debian's chromium + chromedriver, selenium).

Screenshots land in the test's tmp dir (chatbot.png, storymaker.png).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from tunelab.inference.webui import parse_choices

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_parse_choices():
    turn = "You stand at the gate.\n\n1. Knock on the door\n2) Climb the wall\n3. Walk away\n"
    assert parse_choices(turn) == ["Knock on the door", "Climb the wall", "Walk away"]
    assert parse_choices("No choices here.") == []


@pytest.fixture(scope="module")
def app_url(tiny_model):
    pytest.importorskip("gradio")
    from tunelab.inference.engine import GenParams
    from tunelab.inference.host import Host
    from tunelab.inference.webui import build_app, launch

    # Sampling: the tiny random model's greedy reply to a chat prompt is blank lines, which would show no text.
    demo = build_app(Host.load(tiny_model), GenParams(max_new_tokens=12, temperature=1.0, top_p=1.0))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_message_longer_than_the_context_is_refused_in_the_page(app_url, tiny_model):
    """A message whose prompt fills the model's context is refused with a clear error shown in the page (not
    generated past the context); the next message is answered as before."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    c = Client(app_url, verbose=False)
    settings = (Path(tiny_model).name, "You are brief.", 1.0, 1.0, 8)  # model, system, temperature, top-p, tokens
    with pytest.raises(AppError, match="message too long: .* context holds 512"):
        c.predict("hello " * 3000, *settings, api_name="/chat_fn")
    assert c.predict("Hello", *settings, api_name="/chat_fn")


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tunelab-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, css: str, count: int = 1, timeout: float = 90, text: bool = True):
    """Bounded wait until at least `count` elements match `css` (and the last shows text); returns them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        els = d.find_elements(By.CSS_SELECTOR, css)
        return els if len(els) >= count and (not text or els[-1].text.strip()) else False

    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(ready)
    except TimeoutException:
        shown = [e.get_attribute("outerHTML")[:2000] for e in driver.find_elements(By.CSS_SELECTOR, css)]
        raise AssertionError(f"no {count} x {css!r} with text after {timeout}s; found: {shown}") from None


def _idle(driver, css: str, timeout: float = 90):
    """Wait until the component's progress tracker is hidden: the streamed reply has ended."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: all("hide" in e.get_attribute("class")
                      for e in d.find_elements(By.CSS_SELECTOR, f"{css} [data-testid='status-tracker']")))


def test_chatbot_replies_in_the_browser(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    box = _wait(browser, "#chat-input textarea", text=False)[0]
    box.send_keys("Hello there, who are you?\n")
    user = _wait(browser, "#chatbot [data-testid='user']")
    assert "Hello there, who are you?" in user[0].text
    bot = _wait(browser, "#chatbot [data-testid='bot']")
    _idle(browser, "#chatbot")
    assert bot[-1].text.strip()
    assert browser.find_element(By.ID, "settings").is_displayed()
    browser.save_screenshot(str(tmp_path / "chatbot.png"))
    assert (tmp_path / "chatbot.png").stat().st_size > 10_000


def test_storymaker_in_the_browser(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    tabs = _wait(browser, "button[role='tab']", count=2)
    [t for t in tabs if t.text.strip() == "Storymaker"][0].click()
    _wait(browser, "#story-title textarea, #story-title input", text=False)[0].send_keys("The Clockwork Forest")
    browser.find_element(By.ID, "story-begin").click()
    _wait(browser, "#story [data-testid='bot']")
    _idle(browser, "#story")
    # Choices come from the model's turn, or from a second short generation that continues it from "1."; the tiny
    # random model's nonsense usually yields the fallback choices instead. Either way there is something to pick.
    labels = _wait(browser, "#story-choices label", count=2)
    picked = labels[0].text.strip()
    assert picked
    labels[0].click()
    browser.find_element(By.ID, "story-go").click()
    user = _wait(browser, "#story [data-testid='user']")
    assert user[0].text.strip() == picked
    _wait(browser, "#story [data-testid='bot']", count=2)
    _idle(browser, "#story")
    browser.save_screenshot(str(tmp_path / "storymaker.png"))
    assert (tmp_path / "storymaker.png").stat().st_size > 10_000
