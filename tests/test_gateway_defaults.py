"""The gateway's front door on `make serve`'s own defaults (tests/make_serve.py): voices are made
and deleted only with the voices key that make serve writes, while speech takes no key; no other
origin's page may call it; slow clients are cut off; hostile field names neither forge log lines
nor come back a megabyte long; a client gone mid-body is no error; and every response carries an
x-request-id, which reaches Triton as the request id of its csm_stream stream."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from test_gateway import free_port, running

from csm_client import CSMClient
from gateway import GatewayConfig
from gateway.audio import wav_bytes
from make_serve import MakeServe

pytestmark = pytest.mark.server

DEFAULTS = GatewayConfig()
SHORT = {"seed": 7, "max_audio_length_ms": 800}  # 10 frames
SAMPLES_PER_FRAME = 1920
NEW_ID = re.compile(r"req_[0-9a-f]{32}")
SLACK_S = 3.0  # past a timeout, for the event loop and these 2 shared cores


@pytest.fixture(scope="module")
def url(make_serve: MakeServe) -> str:
    return make_serve.gateway_url


def speech_body(**extra: object) -> dict:
    return {"model": "csm-1b", "input": "Hello.", "voice": "alloy", "response_format": "pcm", **SHORT, **extra}


def errors(url: str) -> dict[str, float]:
    """gateway_errors_total by status."""
    text = httpx.get(f"{url}/metrics").text
    return {status: float(value) for status, value in re.findall(r'^gateway_errors_total\{status="(\d+)"\} (\S+)$', text, re.MULTILINE)}


def log_after(make_serve: MakeServe, offset: int, text: str, timeout_s: float = 10.0) -> str:
    """The log written since `offset`, once it holds `text`."""
    deadline = time.monotonic() + timeout_s
    while text not in (log := make_serve.log()[offset:]):
        assert time.monotonic() < deadline, f"no {text!r} in the log within {timeout_s:.0f} s:\n{log[-3000:]}"
        time.sleep(0.2)
    return log


def connect(make_serve: MakeServe) -> socket.socket:
    return socket.create_connection(("127.0.0.1", make_serve.gateway_port), timeout=5)


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """What the gateway sends until it closes the connection (a reset counts as closed); fails
    if it is still open at `deadline` (time.monotonic)."""
    data = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the connection is still open; received {data[:200]!r}") from None
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def read_answer(sock: socket.socket) -> bytes:
    """One response, its head and its Content-Length of body, however it is split; the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(re.search(rb"content-length: (\d+)", data)[1]):
        piece = sock.recv(65536)
        assert piece, f"closed after {data!r}"
        data += piece
    return data


@contextlib.contextmanager
def trickling(sock: socket.socket) -> Iterator[None]:
    """Sends a byte a second on `sock` (far below the 1 KiB/s a body must keep up) while the block runs."""
    done = threading.Event()

    def trickle() -> None:
        while not done.wait(1):
            try:
                sock.send(b" ")
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        yield
    finally:
        done.set()
        sender.join()


def head(request_id: str, length: int) -> bytes:
    return (
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"x-request-id: {request_id}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def clip() -> bytes:
    return wav_bytes((0.2 * np.sin(np.arange(9600) / 7)).astype(np.float32))  # 0.4 s


def test_voices_are_made_and_deleted_only_with_the_voices_key_and_speech_takes_none(make_serve: MakeServe, url: str) -> None:
    key_file = make_serve.voices_key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and f"the key in {key_file}" in make_serve.log()
    form = {"name": "keyed", "consent": "cons_1", "transcript": "A hum."}
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        refused = httpx.post(f"{url}/v1/audio/voices", data=form, files={"audio_sample": ("clip.wav", clip())}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text
    keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=key_file.read_text(), max_retries=0)
    voice = keyed.audio.voices.create(
        name="keyed", audio_sample=("clip.wav", clip(), "audio/wav"), consent="cons_1", extra_body={"transcript": "A hum."}
    )
    assert httpx.delete(f"{url}/v1/audio/voices/{voice.id}").status_code == 401
    assert voice.id in {entry["id"] for entry in httpx.get(f"{url}/v1/audio/voices").json()["data"]}  # still there; listing is open
    anyone = openai.OpenAI(base_url=f"{url}/v1", api_key="no key", max_retries=0)
    spoken = anyone.audio.speech.create(model="csm-1b", input="Hello.", voice="keyed", response_format="pcm", extra_body=SHORT)
    assert len(spoken.content) == 2 * 10 * SAMPLES_PER_FRAME
    assert keyed.audio.voices.delete(voice.id).deleted
    assert voice.id not in {entry["id"] for entry in httpx.get(f"{url}/v1/audio/voices").json()["data"]}


PREFLIGHT = {"Origin": "https://other.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def test_no_other_origin_may_call_the_gateway_unless_configured(make_serve: MakeServe, url: str) -> None:
    assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/audio/speech", headers=PREFLIGHT).headers
    assert "access-control-allow-origin" not in httpx.get(f"{url}/v1/models", headers={"Origin": PREFLIGHT["Origin"]}).headers
    config = GatewayConfig(triton_url=make_serve.grpc_url, port=free_port(), cors_origins=(PREFLIGHT["Origin"],))
    with running(config) as configured:
        allowed = httpx.options(f"{configured}/v1/audio/speech", headers=PREFLIGHT)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == PREFLIGHT["Origin"]
        other = httpx.options(f"{configured}/v1/audio/speech", headers={**PREFLIGHT, "Origin": "https://third.example"})
        assert "access-control-allow-origin" not in other.headers
        read = httpx.get(f"{configured}/v1/models", headers={"Origin": PREFLIGHT["Origin"]})
        assert read.headers["access-control-allow-origin"] == PREFLIGHT["Origin"]
        assert read.headers["access-control-expose-headers"] == "x-request-id, x-context-used"  # a page's script may read them


def test_a_cross_origin_post_a_browser_sends_unasked_starts_nothing(url: str) -> None:
    """A page elsewhere may have the visitor's browser POST text/plain or a form without a preflight:
    the body is a valid speech request, and still it is refused before any work (415)."""
    body = json.dumps(speech_body()).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Origin": PREFLIGHT["Origin"], **({"Content-Type": content_type} if content_type else {})}
        refused = httpx.post(f"{url}/v1/audio/speech", content=body, headers=headers)
        assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type", refused.text
        assert "access-control-allow-origin" not in refused.headers
    assert (
        httpx.post(f"{url}/v1/audio/speech", content=body, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    )


def test_a_connection_without_a_complete_request_head_in_time_is_cut_off(make_serve: MakeServe, url: str) -> None:
    """Half a head, then nothing; nothing at all; and the rest of a body that a refusal (401)
    left unread, trickling in after it: each closed once header_timeout_s has passed."""
    before, offset = errors(url), len(make_serve.log())
    half, silent, refused = connect(make_serve), connect(make_serve), connect(make_serve)
    half.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: localhost\r\nContent-Ty")
    refused.sendall(head("refused-voice", 1_000_000).replace(b"/v1/audio/speech", b"/v1/audio/voices") + b"--boundary\r\n")
    started = time.monotonic()
    assert read_answer(refused).startswith(b"HTTP/1.1 401 ")
    deadline = started + DEFAULTS.header_timeout_s + SLACK_S
    with trickling(refused):
        assert read_until_closed(half, deadline) == read_until_closed(silent, deadline) == read_until_closed(refused, deadline) == b""
    assert time.monotonic() - started > DEFAULTS.header_timeout_s - 1
    assert log_after(make_serve, offset, "connection closed").count(f"no complete request head within {DEFAULTS.header_timeout_s:g} s") == 3
    assert errors(url) == {**before, "401": before.get("401", 0) + 1} and httpx.get(f"{url}/health").status_code == 200


def test_a_body_that_stalls_or_trickles_is_answered_408(make_serve: MakeServe, url: str) -> None:
    """A body that stops is answered 408; one that comes a byte a second (below 1 KiB/s) is cut at
    the same deadline (answered, or reset by the bytes still coming as the gateway closes)."""
    before = errors(url)
    stalled, trickled = connect(make_serve), connect(make_serve)
    stalled.sendall(head("stalled-body", 100_000) + b'{"model": ')
    trickled.sendall(head("trickled-body", 100_000))
    started = time.monotonic()
    deadline = started + DEFAULTS.body_timeout_s + SLACK_S
    with trickling(trickled):
        answer = read_until_closed(stalled, deadline)
        cut = read_until_closed(trickled, deadline)
    assert time.monotonic() - started > DEFAULTS.body_timeout_s - 1
    assert answer.startswith(b"HTTP/1.1 408 ") and b"x-request-id: stalled-body" in answer, answer
    assert cut == b"" or cut.startswith(b"HTTP/1.1 408 "), cut
    after = errors(url)
    assert after.get("500") == before.get("500") and after["408"] - before.get("408", 0) == 2


def test_hostile_field_names_come_back_short_and_forge_no_log_line(make_serve: MakeServe, url: str) -> None:
    offset = len(make_serve.log())
    forged = "gateway: FORGED line"
    newline = httpx.post(f"{url}/v1/audio/speech", json=speech_body(**{f"x\n{forged}": 1}), headers={"x-request-id": "hostile-newline"})
    assert newline.status_code == 400 and newline.json()["error"]["message"] == rf"'x\n{forged}': Extra inputs are not permitted"
    megabyte = httpx.post(f"{url}/v1/audio/speech", json=speech_body(**{"k" * 2**20: 1}), headers={"x-request-id": "hostile-megabyte"})
    error = megabyte.json()["error"]
    assert megabyte.status_code == 400 and error["message"].endswith("(1048576 characters): Extra inputs are not permitted")
    assert len(error["message"]) < 200 and len(error["param"]) < 200
    lines = log_after(make_serve, offset, "[hostile-megabyte] POST").splitlines()
    assert any(line.startswith("[hostile-newline] POST '/v1/audio/speech': 400") and forged in line for line in lines), lines
    assert not any(line.startswith(forged) for line in lines) and max(len(line) for line in lines) < 1000


def test_a_client_gone_mid_body_is_no_error(make_serve: MakeServe, url: str) -> None:
    before, offset = errors(url), len(make_serve.log())
    gone, part = connect(make_serve), b'{"model": "csm-1b", '
    gone.sendall(head("gone-mid-body", 100_000) + part)
    time.sleep(0.5)
    gone.close()
    log_after(make_serve, offset, "[gone-mid-body]")
    time.sleep(1)  # for anything else it would log about that request
    log = make_serve.log()[offset:]
    assert [line for line in log.splitlines() if "gone-mid-body" in line] == [
        f"[gone-mid-body] POST '/v1/audio/speech': the client went away after {len(part)} bytes of its body"
    ]
    assert "Traceback" not in log and errors(url) == before


def test_every_response_carries_a_request_id_and_a_client_s_sane_one_comes_back(url: str) -> None:
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=speech_body()) as streamed:
        assert len(streamed.read()) == 2 * 10 * SAMPLES_PER_FRAME
    responses = {
        "streamed audio": streamed,
        "generate": httpx.post(f"{url}/generate", json={"text": "Hello.", **SHORT}, timeout=60),
        "health": httpx.get(f"{url}/health"),
        "metrics": httpx.get(f"{url}/metrics"),
        "page": httpx.get(f"{url}/"),
        "models": httpx.get(f"{url}/v1/models"),
        "unknown route": httpx.get(f"{url}/nowhere"),
        "invalid": httpx.post(f"{url}/v1/audio/speech", json=speech_body(speed=9)),
        "not json": httpx.post(f"{url}/v1/audio/speech", content=b"{nope", headers={"Content-Type": "application/json"}),
        "refused": httpx.delete(f"{url}/v1/audio/voices/voice_none"),
    }
    statuses = {name: response.status_code for name, response in responses.items()}
    assert statuses == {**dict.fromkeys(responses, 200), "unknown route": 404, "invalid": 400, "not json": 400, "refused": 401}
    ids = [response.headers.get("x-request-id", "") for response in responses.values()]
    assert all(NEW_ID.fullmatch(request_id) for request_id in ids) and len(set(ids)) == len(ids), ids
    for sane in ("client-id_1.2:3/+=@", "x" * 128):
        assert httpx.get(f"{url}/health", headers={"x-request-id": sane}).headers["x-request-id"] == sane
    for insane in ("x" * 129, "two words", "tab\tinside", b"caf\xc3\xa9", 'quote"d', "50%"):
        assert NEW_ID.fullmatch(httpx.get(f"{url}/health", headers={"x-request-id": insane}).headers["x-request-id"]), insane


def test_the_request_id_reaches_triton(make_serve: MakeServe, url: str) -> None:
    """Triton's own verbose log names each request by its id ("[request id: ...] prepared: ...
    model: csm_stream"): the gateway's (through AsyncCSMClient) and csm_client's CSMClient's."""
    triton = httpclient.InferenceServerClient(make_serve.http_url)
    admin = make_serve.admin_headers("http")
    verbose = triton.get_log_settings(headers=admin)["log_verbose_level"]
    offset = len(make_serve.log())
    through_gateway, direct = f"gateway-{uuid.uuid4().hex}", f"client-{uuid.uuid4().hex}"
    triton.update_log_settings({"log_verbose_level": 1}, headers=admin)
    try:
        assert httpx.post(f"{url}/v1/audio/speech", json=speech_body(), headers={"x-request-id": through_gateway}).status_code == 200
        with CSMClient(make_serve.grpc_url, stream_model_name="csm_stream") as client:
            assert len(np.concatenate(list(client.stream("Hello.", 0, request_id=direct, **SHORT)))) == 10 * SAMPLES_PER_FRAME
        log = log_after(make_serve, offset, f"[request id: {direct}] prepared")
    finally:
        triton.update_log_settings({"log_verbose_level": verbose}, headers=admin)
        triton.close()
    for request_id in (through_gateway, direct):
        assert re.search(rf"\[request id: {request_id}\] prepared: .* request id: {request_id}, model: csm_stream,", log), request_id
