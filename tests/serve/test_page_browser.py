"""The page at `GET /`, in a real browser: Debian's Chromium, driven headless by Playwright (the installed
browser; nothing is downloaded). It loads the listings, generates an image on the demo models with progress
and then the image, shows an API error next to the field it names, and keeps the job in its list. Screenshots
go to test-artifacts/."""

import shutil
from pathlib import Path

import pytest

from pipelines.settings import PROJECT_ROOT
from tests.serve.conftest import PORT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = PROJECT_ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="the page's browser test needs Debian's chromium package (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs the tests as root, where Chromium's sandbox cannot start; a container's /dev/shm
        # may be too small for it.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])  # fmt: skip
        yield launched
        launched.close()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"http://127.0.0.1:{PORT}/")
    yield opened
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_the_page_generates_an_image_with_progress(page, client):
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    models = [option.get_attribute("value") for option in page.locator("#model option").all()]
    refiners = [option.get_attribute("value") for option in page.locator("#refiner_checkpoint option").all()]
    assert "demo-sd15" in models and "models--demo--tiny-sdxl-base" in models
    assert refiners[0] == "" and len(refiners) == 2 and refiners[1] not in models  # "none", then the refiner
    assert "Latent" in page.locator("#hires_upscaler").inner_text()
    page.select_option("#model", "demo-sd15")
    assert page.locator("#sampler_name option").count() > 10  # A1111's, for an SD1.5 model
    page.fill("#prompt", "a lighthouse drawn by a browser")
    for field, value in {"#width": "256", "#height": "256", "#steps": "60", "#seed": "21"}.items():
        page.fill(field, value)
    page.click("#submit")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=60_000)
    assert "generation" in page.inner_text("#phase")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    job_id = page.inner_text("#job-id")
    assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")  # live previews were shown
    status = client.get(f"/queue/{job_id}").json()
    assert status["state"] == "done" and status["payload"]["prompt"] == "a lighthouse drawn by a browser"
    assert status["seed"] == 21 and status["payload"]["preview"] is True
    size = page.evaluate(
        "[document.getElementById('image').naturalWidth, document.getElementById('image').naturalHeight]"
    )
    assert size == [256, 256]  # the image file itself, fetched from /queue/{id}/image
    assert "Seed: 21" in page.inner_text("#infotext")
    assert page.get_attribute("#download", "download") == f"{job_id}.png"
    assert "a lighthouse drawn by a browser" in page.inner_text("#history")
    assert screenshot(page, "page-generated.png").stat().st_size > 10_000


def test_the_page_shows_an_api_error_next_to_its_field(page):
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.fill("#width", "100")  # not a multiple of 8: the API's 422 names `width`
    page.click("#submit")
    page.wait_for_function("document.getElementById('error-width').textContent.length > 0")
    assert "multiple of 8" in page.inner_text("#error-width")
    assert page.inner_text("#error-height") == "" and page.is_hidden("#job")
    screenshot(page, "page-field-error.png")


def test_the_page_cancels_a_running_job(page, client):
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    for field, value in {"#width": "512", "#height": "512", "#steps": "150"}.items():
        page.fill(field, value)
    page.click("#submit")
    page.wait_for_selector("#job:not([hidden])")
    page.wait_for_function("document.getElementById('job-id').textContent.length == 32")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('phase').textContent.startsWith('cancelled')", timeout=60_000)
    assert client.get(f"/queue/{page.inner_text('#job-id')}").json()["state"] == "cancelled"


def test_the_page_takes_the_chosen_models_family_samplers_and_defaults(page, client):
    """FLUX.1: its three samplers, CFG 1 and its distilled CFG, sent with the job and in its infotext; back on
    an SD1.5 model: A1111's samplers, CFG 7, no distilled CFG."""
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.select_option("#model", "demo-flux-dev")
    assert [option.get_attribute("value") for option in page.locator("#sampler_name option").all()] == [
        "Euler", "DPM++ 2M", "UniPC"]  # fmt: skip
    assert page.input_value("#cfg_scale") == "1" and page.is_visible("#distilled_cfg_scale")
    assert page.get_attribute("#width", "step") == "16" and page.input_value("#hires_upscaler") == "Lanczos"
    for field, value in {"#width": "64", "#height": "64", "#steps": "4", "#distilled_cfg_scale": "5"}.items():
        page.fill(field, value)
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    status = client.get(f"/queue/{page.inner_text('#job-id')}").json()
    assert status["state"] == "done" and status["payload"]["distilled_cfg_scale"] == 5
    assert "Distilled CFG Scale: 5" in page.inner_text("#infotext") and "Sampler: Euler" in page.inner_text("#infotext")
    screenshot(page, "page-flux.png")
    page.select_option("#model", "demo-sd15")
    assert page.locator("#sampler_name option").count() > 10 and page.input_value("#sampler_name") == "DPM++ 2M"
    assert page.input_value("#cfg_scale") == "7" and page.is_hidden("#distilled_cfg_scale")
    assert page.get_attribute("#width", "step") == "8"
