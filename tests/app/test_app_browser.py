"""End to end in a real browser: start `skyreels-v3 app --model tiny` on loopback, drive it with headless Chromium
(Debian's package, Playwright with `executable_path`), generate a video from an uploaded image, and see a bad input's
error in the page."""

from __future__ import annotations

import shutil

import pytest


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it", allow_module_level=True)
pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from tests.app.server import start_app  # noqa: E402
from tests.helpers import random_image  # noqa: E402


ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    process, url = start_app(out)
    yield url, out
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page()
        page.goto(app_url[0])
        page.wait_for_selector("#reference_to_video-ref-imgs", timeout=60000)
        yield page
        browser.close()


@pytest.mark.slow
def test_reference_to_video_plays_in_the_page(page, app_url, tmp_path):
    image = tmp_path / "face.png"
    random_image(120, 90, seed=1).save(image)
    page.locator("#reference_to_video-ref-imgs input[type=file]").set_input_files([str(image)])
    page.wait_for_selector("#reference_to_video-preview img", timeout=30000)  # the preview shows the upload
    page.locator("#reference_to_video-generate").click()
    page.wait_for_selector("#reference_to_video-result video", timeout=180000)
    state = page.evaluate("""async () => {
        const v = document.querySelector('#reference_to_video-result video');
        if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        return {ready: v.readyState, duration: v.duration, width: v.videoWidth, height: v.videoHeight};
    }""")
    # the tab opens with the original's 5 s (before: 1 s): 121 frames at 24 fps
    assert state["ready"] >= 1 and abs(state["duration"] - 121 / 24) < 0.1 and state["width"] > 0
    assert (
        "skyreels-v3 generate --task reference_to_video --model tiny"
        in page.locator("#reference_to_video-command").inner_text()
    )
    written = list((app_url[1] / "results" / "reference_to_video").glob("*.mp4"))
    assert len(written) == 1


@pytest.mark.slow
def test_five_reference_images_show_an_error_in_the_page(page, tmp_path):
    files = []
    for i in range(5):
        files.append(str(tmp_path / f"r{i}.png"))
        random_image(seed=i).save(files[-1])
    page.locator("#reference_to_video-ref-imgs input[type=file]").set_input_files(files)
    page.wait_for_timeout(1000)
    page.locator("#reference_to_video-generate").click()
    error = page.locator("#reference_to_video-error-ref_imgs")
    error.get_by_text("--ref-imgs").wait_for(timeout=60000)
    assert "1 to 4 images" in error.inner_text()
    assert "Traceback" not in page.content()
