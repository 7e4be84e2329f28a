"""The playground page in a real headless Chromium: load /, send a message, watch the answer stream in."""

from __future__ import annotations

import os

import pytest

from test_serve import NAME, model_dir, running_server  # noqa: F401  (model_dir is a fixture)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def test_playground_streams_an_answer(model_dir):  # noqa: F811
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (install the Debian chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with running_server(model_dir, step_delay=0.003) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert page.title() == "lmforge playground"
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            assert page.eval_on_selector("#model", "s => s.value") == NAME
            page.fill("#max-tokens", "40")
            page.fill("#temperature", "0")
            page.fill("#prompt", "Hello, model!")
            page.click("#send")
            page.wait_for_selector(".message.assistant.streaming", timeout=10_000)
            page.wait_for_selector(".message.assistant[data-done='true']", timeout=30_000)
            answer = page.locator(".message.assistant")
            assert page.locator(".message.user").inner_text() == "Hello, model!"
            assert answer.inner_text().strip()
            assert int(answer.get_attribute("data-chunks")) > 1  # arrived as several streamed pieces
            assert "tokens" in page.inner_text("#status")  # the usage chunk came through
            assert page.locator(".message.error").count() == 0
        finally:
            browser.close()
