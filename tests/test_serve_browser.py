"""The playground page in a real headless Chromium: load /, send a message, watch the answer stream in.

Chromium is the Debian package: when it is missing and we are root with apt-get, the set-up installs
it (once per module); otherwise, or when that fails, the test is skipped with the reason. Never
`playwright install`: that downloads from the internet, which test machines may not reach.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from test_serve import NAME, model_dir, running_server  # noqa: F401  (model_dir is a fixture)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
APT_TIMEOUT = 600  # seconds for apt-get update + install together


def apt_get(*args: str, deadline: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env,
                          timeout=max(1.0, deadline - time.monotonic()))


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr + result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"


def install_chromium() -> str | None:
    """Install the chromium package with apt-get; the reason it could not, or None on success."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root with apt-get, so the set-up cannot install it"
    deadline = time.monotonic() + APT_TIMEOUT
    try:
        result = apt_get("install", "-y", "-qq", "chromium", deadline=deadline)
        if result.returncode != 0:  # most often: no package lists yet (a fresh container)
            update = apt_get("update", "-qq", deadline=deadline)
            if update.returncode != 0:
                return f"apt-get update failed: {last_line(update)}"
            result = apt_get("install", "-y", "-qq", "chromium", deadline=deadline)
    except subprocess.TimeoutExpired:
        return f"apt-get did not finish within {APT_TIMEOUT} s"
    if result.returncode != 0:
        return f"apt-get install chromium failed: {last_line(result)}"
    if not os.path.exists(CHROMIUM):
        return f"apt-get installed chromium but there is no {CHROMIUM}"
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """The path of a Chromium that playwright can drive, installing the Debian package if needed."""
    pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        why = install_chromium()
        if why is not None:
            pytest.skip(f"no Chromium at {CHROMIUM} and {why} (install the Debian chromium package)")
    return CHROMIUM


def test_playground_streams_an_answer(model_dir, chromium):  # noqa: F811
    from playwright import sync_api

    with running_server(model_dir, step_delay=0.003) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
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
