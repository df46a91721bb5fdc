"""Turn references without a server: csm_client.turns signs a turn and opens it again, refuses a
forged, altered, truncated, wrong-key, garbage or oversized one with its reason, and inflates no
more than the largest legal turn; the gateway refuses every bad reference and every mixed turn
with a 400 naming `context[i]`, decided before any Triton call (here there is no Triton at all)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import tracemalloc
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from csm_client.contract import AUDIO_NUM_CODEBOOKS, AUDIO_VOCAB_SIZE, INT32_MAX, MAX_TEXT_BYTES
from csm_client.turns import HEADER, MAX_FRAMES, MAX_PAYLOAD, MAX_REFERENCE_CHARS, open_turn, sign_turn
from gateway import GatewayConfig, create_app

pytestmark = pytest.mark.unit

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CODES = np.random.default_rng(0).integers(0, AUDIO_VOCAB_SIZE, (MAX_FRAMES, AUDIO_NUM_CODEBOOKS)).astype(np.int32)


def signed(payload: bytes, key: bytes = KEY) -> str:
    """A reference of any payload, signed as sign_turn signs one: what only a key holder can make."""
    body = "csm1." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    return body + "." + base64.urlsafe_b64encode(hmac.new(key, body.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


def test_a_turn_opens_as_it_was_signed_and_is_cut_to_what_was_played() -> None:
    text = "é" * (MAX_TEXT_BYTES // 2)  # the longest text, the longest turn: the largest reference
    reference = sign_turn(KEY, text, INT32_MAX, CODES)
    assert reference.startswith("csm1.") and len(reference) <= MAX_REFERENCE_CHARS
    record = open_turn(KEY, reference)
    assert (record.text, record.speaker, record.codes.dtype) == (text, INT32_MAX, np.int32)
    assert np.array_equal(record.codes, CODES)
    assert sign_turn(KEY, text, INT32_MAX, CODES) == reference  # the same turn, the same reference
    assert [len(record.played(ms).codes) for ms in (0, 79, 80, 250, 10**9)] == [0, 0, 1, 3, MAX_FRAMES]
    assert record.played(250).text == text and np.array_equal(record.played(250).codes, CODES[:3])
    silent = open_turn(KEY, sign_turn(KEY, "No audio.", 0, np.zeros((0, AUDIO_NUM_CODEBOOKS), np.int32)))
    assert silent.codes.shape == (0, AUDIO_NUM_CODEBOOKS)
    with pytest.raises(ValueError, match="played_ms must be >= 0"):
        record.played(-1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("x" * (MAX_TEXT_BYTES + 1), 0, CODES[:1]), "text: 4097 bytes"),
        (("\ud800", 0, CODES[:1]), "surrogate"),
        (("Hi.", -1, CODES[:1]), "speaker: must be an integer"),
        (("Hi.", True, CODES[:1]), "speaker: must be an integer"),
        (("Hi.", 0, CODES[:1, :31]), r"codes: must be \[frames, 32\]"),
        (("Hi.", 0, np.zeros((MAX_FRAMES + 1, 32), np.int32)), "at most 375 frames"),
        (("Hi.", 0, np.full((1, 32), AUDIO_VOCAB_SIZE)), r"codes: must be integers in \[0, 2050\]"),
        (("Hi.", 0, np.full((1, 32), 0.5)), "codes: must be integers"),
    ],
)
def test_a_turn_that_is_no_turn_is_not_signed(arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sign_turn(KEY, *arguments)


def flipped(reference: str, index: int) -> str:
    return reference[:index] + ("A" if reference[index] != "A" else "B") + reference[index + 1 :]


REFERENCE = sign_turn(KEY, "An earlier reply.", 1, CODES[:5])
PAYLOAD = zlib.decompress(base64.urlsafe_b64decode(REFERENCE.split(".")[1] + "=="))
BAD = {
    "forged payload": (flipped(REFERENCE, 10), "signature does not match"),
    "forged signature": (flipped(REFERENCE, len(REFERENCE) - 5), "signature does not match"),
    "truncated": (REFERENCE[:-1], "no turn reference"),
    "truncated payload": (REFERENCE[:20] + REFERENCE[REFERENCE.rindex(".") :], "signature does not match"),
    "wrong key": (sign_turn(OTHER_KEY, "An earlier reply.", 1, CODES[:5]), "signature does not match"),
    "garbage": ("hello", "is not a turn reference"),
    "another version": ("csm2" + REFERENCE[4:], "is not a turn reference"),
    "not base64url": (REFERENCE.replace(".", ".+", 1), "no turn reference"),
    "oversized": ("csm1." + "A" * MAX_REFERENCE_CHARS, "longer than any turn reference"),
    "signed, no zlib": (signed(b"not zlib"), "holds no turn"),
    "signed, two streams": (signed(zlib.compress(PAYLOAD) * 2), "not one whole zlib stream"),
    "signed, cut short": (signed(zlib.compress(PAYLOAD)[:-3]), "not one whole zlib stream"),
    "signed, wrong length": (signed(zlib.compress(PAYLOAD + b"\0")), "holds no turn: speaker 1"),
    "signed, codes too large": (
        signed(zlib.compress(HEADER.pack(0, 0, 1) + np.full(32, 4000, "<i2").tobytes())),
        r"codes outside \[0, 2050\]",
    ),
    "signed, text no UTF-8": (signed(zlib.compress(HEADER.pack(0, 1, 0) + b"\xff")), "holds no turn"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_reference_is_refused_with_its_reason(name: str) -> None:
    reference, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        open_turn(KEY, reference)


def test_a_signed_zlib_bomb_inflates_no_more_than_the_largest_turn() -> None:
    """Even with the key (a leaked one), 10 MB of zeros in a ~10 KB reference stops at MAX_PAYLOAD."""
    bomb = signed(zlib.compress(b"\0" * 10_000_000, 9))
    assert len(bomb) < MAX_REFERENCE_CHARS
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="larger than any turn's"):
            open_turn(KEY, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_PAYLOAD, peak


# -- the gateway: every bad reference is a 400 naming context[i], with no Triton behind it ---------

SECRET = "t" * 32


@pytest.fixture(scope="module")
def gateway() -> TestClient:
    # Nothing listens on port 9: a request that reached for Triton would be a 503, never a 400.
    return TestClient(create_app(GatewayConfig(triton_url="127.0.0.1:9", turn_key=SECRET)))


def speech_with(gateway: TestClient, *context: dict) -> dict:
    body = {"model": "csm-1b", "input": "Hello.", "voice": "alloy", "context": list(context)}
    response = gateway.post("/v1/audio/speech", json=body)
    assert response.status_code == 400, response.text
    return response.json()["error"]


GOOD = {"ref": sign_turn(SECRET.encode(), "Fine.", 0, CODES[:2])}


@pytest.mark.parametrize(
    ("turn", "message", "code"),
    [
        ({"ref": BAD["forged payload"][0]}, "context[1].ref: its signature does not match", "invalid_turn_ref"),
        ({"ref": REFERENCE}, "context[1].ref: its signature does not match", "invalid_turn_ref"),  # another key's
        ({"ref": BAD["truncated"][0]}, "context[1].ref: is no turn reference", "invalid_turn_ref"),
        ({"ref": "hello"}, "context[1].ref: is not a turn reference", "invalid_turn_ref"),
        ({"ref": BAD["oversized"][0]}, "context[1].ref: is 37556 characters, longer than any turn reference (37551)", "invalid_turn_ref"),
        ({**GOOD, "text": "Fine."}, "context[1]: holds a ref and text", "invalid_value"),
        ({**GOOD, "speaker": 0}, "context[1]: holds a ref and text, speaker", "invalid_value"),
        ({**GOOD, "codes": [[1] * 32]}, "context[1]: holds a ref and", "invalid_value"),
        ({"text": "Hi.", "speaker": 0, "played_ms": 80}, "context[1].played_ms: goes with a ref", "invalid_value"),
        ({"text": "Hi."}, "context[1]: needs text and speaker (or a ref)", "missing_field"),
        ({"speaker": 0}, "context[1]: needs text and speaker (or a ref)", "missing_field"),
    ],
    ids=lambda value: value if isinstance(value, str) and " " in value else None,
)
def test_a_bad_reference_or_a_mixed_turn_is_400_naming_it_before_any_triton_call(
    gateway: TestClient, turn: dict, message: str, code: str
) -> None:
    error = speech_with(gateway, GOOD, turn)
    assert (error["param"], error["code"]) == ("context", code) and error["message"].startswith(message), error


def test_played_ms_is_a_whole_number_of_milliseconds(gateway: TestClient) -> None:
    for played in (-1, 2**31, 1.5, "soon"):
        error = speech_with(gateway, {**GOOD, "played_ms": played})
        assert error["param"] == "context" and error["message"].startswith("context.0.played_ms:"), error
    error = speech_with(gateway, {**GOOD, "played_ms": 0}, {"ref": GOOD["ref"] + "x"})  # the first turn passed
    assert error["message"].startswith("context[1].ref:"), error
    overflow = gateway.post("/generate", json={"text": "Hi.", "context_overflow": "drop_newest"}).json()["error"]
    assert overflow["param"] == "context_overflow", overflow


def test_a_turn_key_is_long_or_none_and_none_warns_that_references_stay_on_this_replica(caplog: pytest.LogCaptureFixture) -> None:
    assert GatewayConfig.from_env({"CSM_GATEWAY_TURN_KEY": SECRET}).turn_key == SECRET
    assert SECRET not in repr(GatewayConfig(turn_key=SECRET))
    with pytest.raises(ValueError, match="turn_key: at least 32 characters"):
        GatewayConfig(turn_key="short")
    with caplog.at_level(logging.WARNING, logger="gateway"):
        first, second = create_app(GatewayConfig()), create_app(GatewayConfig())
    assert "turn_key not set" in caplog.text and "this replica only" in caplog.text
    assert first.state.gateway.turn_key != second.state.gateway.turn_key  # random, one per process
    assert create_app(GatewayConfig(turn_key=SECRET)).state.gateway.turn_key == SECRET.encode()
