"""The web page at `/` in headless Chromium against a real uvicorn: pick a task, upload, see the bars.

Needs Debian's `chromium` (apt) and the `playwright` Python package (pip; its bundled driver only,
never `playwright install`): skipped with the reason when either is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.service import OFFICE, SERVED_ENV, image_bytes, make_set, publish, service_process

from mmap_model import rollouts

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip package 'playwright' is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian package 'chromium' is not installed")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.slow  # a real process start (imports torch): seconds to tens of seconds
def test_page_classifies_an_upload_and_a_sample(tiny, tmp_path):
    prompts = tmp_path / "prompts"
    office = make_set(tiny, "office", OFFICE, 1)
    target = publish(office, prompts)
    (target / "samples" / "clipart").mkdir(parents=True)
    for i in range(3):
        (target / "samples" / "clipart" / f"sample{i}.png").write_bytes(image_bytes(50 + i, size=(96, 96)))
    upload = tmp_path / "photo.jpg"
    upload.write_bytes(image_bytes(7, size=(320, 240), fmt="JPEG"))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    a_text_file = tmp_path / "notes.txt"
    a_text_file.write_text("plain text")
    screenshot = tmp_path / "page.png"
    env = {**SERVED_ENV, "MMAP_PROMPTS": str(prompts)}

    with service_process(tmp_path / "service.log", [], env) as (base, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(f"{base}/")
            page.wait_for_selector("#task option[value='clipart']", state="attached")
            page.select_option("#task", "clipart")
            assert office.version in page.inner_text("#task-info")
            assert page.locator("#samples button").count() == 3

            page.set_input_files("#file", str(upload))
            bars = page.locator("#results .bar")
            bars.first.wait_for()
            assert bars.count() == 4  # top 5 of a 4-class task
            labels = [page.locator("#results .bar .label").nth(i).inner_text() for i in range(4)]
            assert sorted(labels) == sorted(OFFICE["clipart"].classnames)
            assert page.inner_text("#version") == f"office v{office.version}"
            widths = page.eval_on_selector_all("#results .fill", "els => els.map(e => e.getBoundingClientRect().width)")
            assert widths == sorted(widths, reverse=True) and widths[0] > 0
            page.screenshot(path=str(screenshot), full_page=True)

            page.select_option("#task", "product")  # re-classifies the same image for the new task
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('product')")
            assert bars.count() == 3

            page.select_option("#task", "clipart")
            page.locator("#samples button").first.click()
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('clipart')")
            assert bars.count() == 4

            page.fill("#labels", "kettle, dog")  # the caller's own class names, with the task's prompts
            page.dispatch_event("#labels", "change")
            page.wait_for_function("document.querySelectorAll('#results .bar').length === 2")
            own = {page.locator("#results .bar .label").nth(i).inner_text() for i in range(2)}
            assert own == {"kettle", "dog"}
            page.fill("#labels", "")

            page.set_input_files("#file", str(not_an_image))  # claims to be a PNG: the service says why not
            page.wait_for_selector("#status.error")
            assert "415" in page.inner_text("#status") and bars.count() == 0
            page.wait_for_function("document.querySelector('#preview').hidden")  # no broken preview
            page.set_input_files("#file", str(a_text_file))  # not even claimed to be an image: said before sending
            page.wait_for_function("document.querySelector('#status').textContent.includes('is not an image')")

            # /docs renders the API with every request to anything but the service refused (air-gapped host).
            docs = browser.new_page()
            docs.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
            docs.goto(f"{base}/docs")
            docs.wait_for_selector(".opblock-summary-path[data-path='/classify']")
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0
    print(f"screenshot: {Path(screenshot)}")


@pytest.mark.slow
def test_page_shows_a_rollout_its_figures_and_abstention(tiny, tmp_path):
    """A task in a shadow rollout: the page names the live and the candidate version, and the figures move as it
    classifies; with a min score no prediction reaches, it says it abstains."""
    prompts = tmp_path / "prompts"
    live = make_set(tiny, "office", OFFICE, 1)
    publish(live, prompts)
    rollouts.start(prompts, "clipart", "office2", "shadow", 100)
    candidate = make_set(tiny, "office2", OFFICE, 2)
    publish(candidate, prompts)
    upload = tmp_path / "photo.png"
    upload.write_bytes(image_bytes(7, size=(96, 96)))
    env = {**SERVED_ENV, "MMAP_PROMPTS": str(prompts)}

    with service_process(tmp_path / "service.log", [], env) as (base, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{base}/?task=clipart")
            page.wait_for_selector("#task-rollout:not([hidden])")
            text = page.inner_text("#task-rollout")
            assert f"live office v{live.version}" in text and f"candidate office2 v{candidate.version}" in text
            assert "shadow 100% · active" in text
            page.set_input_files("#file", str(upload))
            page.wait_for_function("document.querySelector('#task-rollout').textContent.includes('1 compared')",
                                   timeout=10_000)  # (scored within 0.5 s; the page refreshes every 2 s)
            assert f"live v{live.version}: 1 requests" in page.inner_text("#task-rollout")
            assert page.inner_text("#version") == f"office v{live.version}"  # the caller gets the live answer
            page.fill("#min-score", "1")  # abstention: no score reaches 1
            page.dispatch_event("#min-score", "change")
            page.wait_for_function("document.querySelector('#status').textContent.includes('abstained')")
            assert page.locator("#results.abstained .bar").count() == 4  # the predictions are still shown
            page.fill("#min-score", "0")
            page.dispatch_event("#min-score", "change")
            page.wait_for_function("!document.querySelector('#status').textContent.includes('abstained') && "
                                   "document.querySelector('#status').textContent.startsWith('clipart')")
            page.select_option("#task", "product")  # no rollout there
            page.wait_for_selector("#task-rollout", state="hidden")
        finally:
            browser.close()
