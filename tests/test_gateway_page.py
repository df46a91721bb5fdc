"""The gateway's page (gateway/static/index.html) in a real headless browser: Debian's chromium
driven by Playwright, against the gateway and a real tritonserver on the tiny model. It loads with
no console error, speaks a line whose audio arrives in chunks and downloads it as WAV, and stops a
long line, which cancels its Triton stream.

`make test` installs chromium where it can (apt-get as root); elsewhere the test is skipped, but
never under CI (the CI variable set), where a missing browser fails it."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from test_gateway import SAMPLES_PER_FRAME, free_port, running, settle
from test_metrics import series, settled

from csm_triton.tools.server import TritonServer
from gateway import GatewayConfig
from gateway.audio import wav_bytes

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
VOICES_KEY = "page-test-voices-key"
# The README's picture of the page is taken again only when asked (CSM_PAGE_SCREENSHOT=docs/gateway_page.png):
# a test run leaves the checkout as it found it.
SCREENSHOT = os.environ.get("CSM_PAGE_SCREENSHOT")
# Playwright's own browser download is unreachable here; Debian's chromium is driven instead.
if not shutil.which(CHROMIUM):
    if os.environ.get("CI"):
        pytest.fail(f"no chromium at {CHROMIUM}: under CI the page test must run (apt-get install chromium)", pytrace=False)
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; make test installs it as root)", allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402 (after the browser check)

pytestmark = [pytest.mark.server, pytest.mark.browser]


@pytest.fixture(scope="module")
def gateway(triton_server: TritonServer) -> Iterator[str]:
    with running(GatewayConfig(triton_url=triton_server.grpc_url, port=free_port(), voice_keys=(VOICES_KEY,))) as url:
        yield url


@contextlib.contextmanager
def loaded(url: str, *args: str) -> Iterator[tuple[Page, list[str]]]:
    """The page at `url` in headless chromium (with `args` besides the test's own), and the console
    errors and uncaught exceptions it has logged so far."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required", *args]
        )
        tab = browser.new_page(accept_downloads=True)
        errors: list[str] = []
        tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(url)
        tab.wait_for_function("document.querySelectorAll('#voice option').length > 0")
        try:
            yield tab, errors
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(gateway: str) -> Iterator[tuple[Page, list[str]]]:
    with loaded(gateway) as tab_and_errors:
        yield tab_and_errors


def test_the_page_speaks_a_line_in_chunks_and_downloads_it(page: tuple[Page, list[str]], tmp_path: Path) -> None:
    tab, errors = page
    assert "alloy (speaker 0)" in tab.locator("#voice").inner_text()
    tab.fill("#text", "Hello from the page.")
    tab.fill("#seed", "3")
    tab.fill("#max-ms", "2400")  # 30 frames
    tab.select_option("#voice", "nova")
    tab.click("#speak")
    tab.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
    assert int(tab.inner_text("#chunks")) >= 3  # the first chunk (2 frames), then the server's schedule
    assert re.fullmatch(r"\d+ ms", tab.inner_text("#ttfa"))
    assert tab.inner_text("#seconds") == "2.40 s"
    picture = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "gateway_page.png"
    tab.screenshot(path=str(picture), full_page=True)
    assert picture.stat().st_size > 10_000
    with tab.expect_download() as download:
        tab.click("#download")
    samples, rate = soundfile.read(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert rate == 24_000 and len(samples) == 30 * SAMPLES_PER_FRAME
    assert errors == []


def test_a_voice_uploaded_on_the_page_speaks(page: tuple[Page, list[str]], tmp_path: Path) -> None:
    tab, errors = page
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes((0.2 * np.sin(np.arange(9600) / 7)).astype(np.float32)))
    tab.click("#upload summary")
    tab.fill("#voice-name", "page-voice")
    tab.set_input_files("#voice-clip", str(clip))
    tab.fill("#voice-consent", "cons_page")
    tab.fill("#voice-transcript", "A hum.")
    tab.click("#voice-add")  # without the voices key: the gateway's 401 is shown
    tab.wait_for_function("document.getElementById('voice-status').textContent.startsWith('401')", timeout=30_000)
    assert "voices key" in tab.inner_text("#voice-status")
    # chromium logs every 4xx response as a console error: that one, and no other, is expected here
    assert len(errors) == 1 and "status of 401" in errors[0]
    errors.clear()
    tab.fill("#voice-key", VOICES_KEY)
    tab.click("#voice-add")
    tab.wait_for_function("document.getElementById('voice-status').textContent === 'added page-voice'", timeout=30_000)
    assert tab.eval_on_selector("#voice", "select => select.selectedOptions[0].textContent").startswith(
        "page-voice (speaker 0, reference clip)"
    )
    tab.fill("#text", "Spoken in the new voice.")
    tab.fill("#max-ms", "800")
    tab.click("#speak")
    tab.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
    assert tab.inner_text("#seconds") == "0.80 s" and errors == []
    tab.fill("#voice-name", "page-voice")  # the same name again: the gateway's 400 is shown
    tab.click("#voice-add")
    tab.wait_for_function("document.getElementById('voice-status').textContent.startsWith('400')", timeout=30_000)
    assert "exists already" in tab.inner_text("#voice-status")
    assert len(errors) == 1 and "status of 400" in errors[0]
    errors.clear()


def test_stop_cancels_a_long_line(page: tuple[Page, list[str]], triton_server: TritonServer) -> None:
    tab, errors = page
    cancelled = series("csm_rejected_requests_total", reason="cancelled", field="")
    before = settled(triton_server).get(cancelled, 0.0)  # once earlier cancels have been reported
    tab.fill("#text", "A long line that would take twenty seconds of audio to say, were it not stopped.")
    tab.fill("#seed", "")
    tab.fill("#max-ms", "20000")
    tab.click("#speak")
    tab.wait_for_function("Number(document.getElementById('chunks').textContent) >= 2", timeout=60_000)
    tab.click("#stop")
    tab.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=10_000)
    assert float(tab.inner_text("#seconds").removesuffix(" s")) < 10
    assert settle(triton_server, cancelled, lambda value: value > before)[cancelled] == before + 1
    assert tab.is_enabled("#speak") and not tab.is_enabled("#stop")
    assert errors == []
