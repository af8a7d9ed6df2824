"""The page at `/` of `tinygptv-edge serve`, driven in headless Chromium (selenium + Debian's chromium).

Skipped, with the reason, where Chromium or its driver is not installed
(`apt-get install chromium chromium-driver`). The screenshot is kept in the test's tmp_path (and copied
to $TEST_ARTIFACTS when set, for CI to upload).
"""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.torch

from helpers.serve import require_serve_stack  # noqa: E402

require_serve_stack()
pytest.importorskip("selenium", reason="selenium (dev extra) is not installed")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "headless Chromium is not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from helpers.serve import LiveServer, loader, png  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tinygptv_edge.runtime.pipeline import Pipeline  # noqa: E402
from tinygptv_edge.runtime.sampling import SamplingConfig  # noqa: E402

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=900,900",
)
N = 8


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


def answer_of(driver, question: str, timeout: float = 60) -> tuple[str, int]:
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error"))
    )
    status = driver.find_element(By.ID, "status").text
    assert status.startswith("done"), status
    text = driver.execute_script("return document.getElementById('answer').textContent")
    pieces = driver.execute_script("return Number(document.getElementById('answer').dataset.pieces || 0)")
    return text, pieces


def test_page_streams_the_answer(files, browser, tmp_path):
    img = tmp_path / "photo.png"
    img.write_bytes(png(7))
    with LiveServer(loader(files)) as s:
        browser.get(s.url + "/")
        assert browser.title.startswith("TinyGPT-V")
        browser.find_element(By.TAG_NAME, "summary").click()
        tokens = browser.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys(str(N))
        browser.find_element(By.ID, "image").send_keys(str(img))
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        first, pieces = answer_of(browser, "what is in the picture?")
        second, _ = answer_of(browser, "and the colours?")  # a follow-up: the page sends the history
        shot = tmp_path / "serve-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        if os.environ.get("TEST_ARTIFACTS"):
            shutil.copy(shot, os.environ["TEST_ARTIFACTS"])
    with Pipeline(files[0], files[1], n_threads=1) as pipe:
        chat = pipe.chat(SamplingConfig(max_new_tokens=N))
        want1 = chat.ask("what is in the picture?", png(7)).text
        want2 = chat.ask("and the colours?").text
    assert first == want1 and pieces >= 2  # it arrived in pieces
    assert second == want2


def set_max_tokens(driver, n: int) -> None:
    driver.execute_script("document.querySelector('details').open = true")
    tokens = driver.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys(str(n))


def record_requests(driver) -> None:
    """Keep every body the page POSTs in window.sent (to read the history it sends)."""
    driver.execute_script(
        "window.sent = []; const f = window.fetch;"
        "window.fetch = (u, o) => { if (o && o.body) window.sent.push(JSON.parse(o.body)); return f(u, o); };"
    )


def give_file(driver, event: str, data: bytes, name: str, mime: str) -> None:
    """A paste (on the question box) or a drop (on the page) carrying one file."""
    import base64

    driver.execute_script(
        """
        const [event, b64, name, mime] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: mime }));
        const ev = event === "paste"
          ? new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true })
          : new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true });
        (event === "paste" ? document.getElementById("question") : document.body).dispatchEvent(ev);
        """,
        event,
        base64.b64encode(data).decode(),
        name,
        mime,
    )


def wait_status(driver, *prefixes: str, timeout: float = 60) -> str:
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "status").text.startswith(prefixes))
    return driver.find_element(By.ID, "status").text


def test_enter_sends_shift_enter_breaks_the_line_timings_and_model_shown(files, browser):
    from selenium.webdriver.common.keys import Keys

    with LiveServer(loader(files)) as s:
        browser.get(s.url + "/")
        set_max_tokens(browser, N)
        box = browser.find_element(By.ID, "question")
        box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
        assert browser.execute_script("return document.getElementById('question').value") == (
            "first line\nsecond line"
        )
        assert browser.find_element(By.ID, "status").text == ""  # nothing sent yet
        box.send_keys(Keys.ENTER)
        status = wait_status(browser, "done", "error")
        assert status.startswith("done") and "tok/s" in status and "first token" in status, status
        assert "tinygptv-edge" in status and "tokens" in status
        assert "tinygptv-edge" in browser.find_element(By.ID, "model").text
    with Pipeline(files[0], files[1], n_threads=1) as pipe:
        want = pipe.ask("first line\nsecond line", None, SamplingConfig(max_new_tokens=N)).text
    assert browser.execute_script("return document.getElementById('answer').textContent") == want


def test_paste_and_drop_an_image(files, browser):
    with LiveServer(loader(files)) as s:
        browser.get(s.url + "/")
        set_max_tokens(browser, N)
        record_requests(browser)
        for event, seed in (("paste", 11), ("drop", 12)):
            give_file(browser, event, png(seed), f"{event}.png", "image/png")
            WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
            answer_of(browser, "what is in the picture?")
            sent = browser.execute_script("return window.sent[window.sent.length - 1]")
            parts = sent["messages"][-1]["content"]
            assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
            assert not browser.find_element(By.ID, "preview").is_displayed()  # sent with that question only
        imgs = browser.find_elements(By.CSS_SELECTOR, "#log .user img")
        assert len(imgs) == 2 and all(
            browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in imgs
        )


def test_a_refused_file_cleans_up(files, browser, tmp_path):
    import io

    from PIL import Image

    text = tmp_path / "notes.png"  # not an image, whatever its name says
    text.write_bytes(b"these are my notes, not a picture")
    with LiveServer(loader(files)) as s:
        browser.get(s.url + "/")
        set_max_tokens(browser, N)
        browser.find_element(By.ID, "image").send_keys(str(text))
        status = wait_status(browser, "error", timeout=10)
        assert "not an image" in status
        assert not browser.find_element(By.ID, "preview").is_displayed()
        assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
        # an image the browser reads but the server refuses (over 32 megapixels): no bubbles left behind
        buf = io.BytesIO()
        Image.new("L", (6000, 6000)).save(buf, "PNG")
        give_file(browser, "drop", buf.getvalue(), "huge.png", "image/png")
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        box = browser.find_element(By.ID, "question")
        box.send_keys("what is it?")
        browser.find_element(By.ID, "send").click()
        status = wait_status(browser, "error", "done")
        assert status.startswith("error") and "image" in status, status
        assert (
            browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
        )  # no empty bubble, no orphan question
        assert browser.execute_script("return document.getElementById('question').value") == "what is it?"
        assert not browser.find_element(By.ID, "preview").is_displayed()
        broken = browser.execute_script(
            "return [...document.images]"
            ".filter((i) => i.getAttribute('src') && i.complete && !i.naturalWidth).length"
        )
        assert broken == 0
        answer_of(browser, "and now?")  # the page still works


def test_a_stopped_answer_stays_in_the_history(files, browser):
    with LiveServer(loader(files, delay=0.1)) as s:
        browser.get(s.url + "/")
        set_max_tokens(browser, 200)
        record_requests(browser)
        box = browser.find_element(By.ID, "question")
        box.send_keys("tell me a long story")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(
            lambda d: (
                int(d.execute_script("return Number(document.getElementById('answer').dataset.pieces || 0)"))
                >= 2
            )
        )
        browser.find_element(By.ID, "stop").click()
        wait_status(browser, "stopped", timeout=10)
        shown = browser.execute_script("return document.getElementById('answer').textContent")
        assert shown
        set_max_tokens(browser, 2)
        answer_of(browser, "go on")
        sent = browser.execute_script("return window.sent[window.sent.length - 1]")["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"] == shown and sent[2]["content"] == "go on"
