"""The page as a conversation, in headless chromium with its fake capture device (a tone from a
WAV file in place of a microphone), against the gateway and a real tritonserver on the tiny model:
the requests the page sends carry a typed line as text, a recorded line as its audio, each earlier
reply by its reference, a reply stopped after it completed by reference with played_ms, and one
stopped while it streamed by the reference of the turn so far (its last delta event's) with
played_ms; each reply's waveform is drawn as it streams."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from playwright.sync_api import Page
from test_gateway import free_port, running
from test_gateway_page import loaded
from test_gateway_units import tone

from csm_client.turns import open_turn
from csm_triton.tools.server import TritonServer
from gateway import GatewayConfig

pytestmark = [pytest.mark.server, pytest.mark.browser]

KEY = "conversation-page-test-turn-key-of-32-characters"
# The pixels a canvas has drawn on (their alpha not 0).
INKED = "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 === 3 && v).length"


@pytest.fixture(scope="module")
def gateway(triton_server: TritonServer) -> Iterator[str]:
    with running(GatewayConfig(triton_url=triton_server.grpc_url, port=free_port(), turn_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the fake capture device hears: a 220 Hz tone, over and over."""
    path = tmp_path_factory.mktemp("microphone") / "tone.wav"
    soundfile.write(path, tone(2.0, 48_000), 48_000, subtype="PCM_16")
    return path


def speak(tab: Page, text: str, max_ms: int) -> dict:
    """Has the voice speak `text`: the body of the request the page sent, once its answer has begun."""
    tab.fill("#text", text)
    tab.fill("#max-ms", str(max_ms))
    with tab.expect_response(lambda response: response.url.endswith("/v1/audio/speech")) as response:
        tab.click("#speak")
    return response.value.request.post_data_json


def reaches(tab: Page, status: str) -> None:
    tab.wait_for_function(f"document.getElementById('status').textContent === {status!r}", timeout=60_000)


def text_of(reference: str) -> str:
    return open_turn(KEY.encode(), reference).text


def test_a_conversation_on_the_page_sends_each_turn_as_it_was_said_and_played(gateway: str, microphone: Path) -> None:
    fake_devices = (
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
    )
    with loaded(gateway, *fake_devices) as (tab, errors):
        tab.fill("#seed", "1")
        tab.fill("#user-text", "Hi there, how are you?")
        tab.click("#say")
        first = speak(tab, "Fine, thanks.", 800)
        reaches(tab, "done")
        assert first["context"] == [{"text": "Hi there, how are you?", "speaker": 1}]
        assert (first["stream_format"], first["context_overflow"]) == ("sse", "drop_oldest")

        # A spoken line: recorded from the (fake) microphone, sent as its audio so the model hears it.
        tab.click("#record")
        reaches(tab, "recording")
        tab.wait_for_timeout(1000)
        tab.click("#record")
        tab.wait_for_function("document.querySelectorAll('#turns li').length === 3")
        second = speak(tab, "Good to hear your voice.", 2400)
        # Its output paused (the listener's speakers held), so that it is stopped after it completed.
        tab.evaluate("audioContext.suspend()")
        reaches(tab, "done")
        assert second["context"][0] == first["context"][0] and set(second["context"][1]) == {"ref"}
        assert text_of(second["context"][1]["ref"]) == "Fine, thanks."  # the earlier reply, by reference
        recorded = second["context"][2]
        assert (set(recorded), recorded["speaker"], recorded["text"]) == ({"text", "speaker", "audio"}, 1, "")
        samples, rate = soundfile.read(io.BytesIO(base64.b64decode(recorded["audio"])))
        loudest_hz = np.argmax(np.abs(np.fft.rfft(samples))) * rate / len(samples)  # the microphone's tone, at the device's rate
        assert 0.5 < len(samples) / rate < 3 and abs(loudest_hz - 220) < 5, (len(samples), rate, loudest_hz)

        tab.evaluate("audioContext.resume()")
        tab.wait_for_timeout(400)
        tab.click("#stop")  # while it plays: it goes back by reference, cut to what was played
        assert tab.inner_text("#status") == "stopped" and not tab.is_enabled("#stop")
        third = speak(tab, "Shall I go on?", 20_000)
        stopped = third["context"][3]
        assert set(stopped) == {"ref", "played_ms"} and 200 <= stopped["played_ms"] < 2400, stopped
        assert text_of(stopped["ref"]) == "Good to hear your voice." and third["context"][:3] == second["context"]

        # Stopped while it streams, once some of it has played: cancelled, and it goes back by the
        # reference of its last delta event (the turn so far) with played_ms, no more than the audio received.
        tab.wait_for_function("Number(document.getElementById('chunks').textContent) >= 2 && playedSeconds() > 0.1", timeout=60_000)
        tab.click("#stop")
        reaches(tab, "stopped")
        assert "before it completed" in tab.inner_text("#turns li:last-child .note")  # it was still streaming
        received = tab.evaluate("pcmParts.reduce((sum, part) => sum + part.length / 2, 0)")  # samples at 24 kHz
        fourth = speak(tab, "All right.", 800)
        reaches(tab, "done")
        cut = fourth["context"][4]
        assert set(cut) == {"ref", "played_ms"} and 100 <= cut["played_ms"] <= received * 1000 / 24_000, (cut, received)
        so_far = open_turn(KEY.encode(), cut["ref"])
        assert (so_far.text, so_far.speaker) == ("Shall I go on?", 0) and len(so_far.codes) * 1920 >= received > 0

        # Every turn listed, each reply's waveform drawn, and all five earlier turns in the last prompt.
        assert tab.eval_on_selector_all("#turns li", "items => items.map(item => item.className)") == [
            "turn user", "turn reply", "turn user", "turn reply", "turn reply", "turn reply"
        ]  # fmt: skip
        inked = tab.eval_on_selector_all("#turns li.reply canvas", f"canvases => canvases.map({INKED})")
        assert all(count > 0 for count in inked), inked
        assert tab.inner_text("#used") == "5 of 5 turns"
        assert errors == []
