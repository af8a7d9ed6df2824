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

pytest.importorskip("torch")  # the fixture exports the tiny model
pytest.importorskip("tinygptv_edge.runtime.language.decoder")
for _mod in ("starlette", "uvicorn", "pydantic", "llguidance"):
    pytest.importorskip(_mod, reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("selenium", reason="selenium (dev extra) is not installed")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "headless Chromium is not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from helpers.serve import LiveServer, export_files, loader, png  # noqa: E402
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


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    return export_files(tiny, tmp_path_factory.mktemp("web"))


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
