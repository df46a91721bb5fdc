"""Conversations through the gateway against a real tritonserver on the tiny model: turns carried
by reference alone, one of them interrupted, each turn's prompt holding what was said and played
(its codes those of the same request sent with the explicit codes, cut where the turn was cut);
every sse delta carrying the reference of the turn so far, by which a reply stopped mid-stream
goes back; references open on any replica that shares the key and on no other, a forged one is
refused; and a conversation longer than the prompt keeps being answered under drop_oldest, the
voice pinned."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from test_gateway import SAMPLES_PER_FRAME, free_port, running, sse_events
from test_gateway_units import tone

from csm_client.contract import AUDIO_NUM_CODEBOOKS, FRAME_MS
from csm_client.turns import MAX_FRAMES, TurnRecord, open_turn, sign_turn
from csm_triton.tools.server import TritonServer
from gateway import GatewayConfig
from gateway.audio import wav_bytes

pytestmark = pytest.mark.server

KEY = "conversation-test-turn-key-of-32-characters"
TURNS = 12
INTERRUPTED, PLAYED_MS = 4, 100  # turn 4 heard for 100 ms: its first frame
FRAMES_MS = 320  # each reply: 4 frames at most, so that twelve turns take seconds


@pytest.fixture(scope="module")
def config(triton_server: TritonServer) -> GatewayConfig:
    return GatewayConfig(triton_url=triton_server.grpc_url, port=free_port(), turn_key=KEY, open_voices=True)


@pytest.fixture(scope="module")
def gateway(config: GatewayConfig) -> Iterator[str]:
    with running(config) as url:
        yield url


def opened(reference: str) -> TurnRecord:
    return open_turn(KEY.encode(), reference)


def say(url: str, index: int, context: list[dict], route: str = "speech") -> dict:
    """Turn `index` of the conversation (speaker index % 2, seed index) after `context`: the JSON of
    /generate, or the final event of /v1/audio/speech's sse with the audio its deltas carried
    and its x-context-used header."""
    line = {"seed": index, "max_audio_length_ms": FRAMES_MS, "context": context}
    if route == "generate":
        response = httpx.post(f"{url}/generate", json={"text": f"Turn {index}.", "speaker": index % 2, **line}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()
    body = {"model": "csm-1b", "input": f"Turn {index}.", "voice": ("alloy", "ash")[index % 2], "response_format": "pcm",
            "stream_format": "sse", **line}  # fmt: skip
    response = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 200, response.text
    *deltas, done = sse_events(response.content)
    assert done["type"] == "speech.audio.done" and all(delta["type"] == "speech.audio.delta" for delta in deltas)
    header = response.headers["x-context-used"]
    assert [int(turn) for turn in header.split(",") if turn] == done["context_used"]
    return {**done, "audio": b"".join(base64.b64decode(delta["audio"]) for delta in deltas)}


def by_reference(references: list[str]) -> list[dict]:
    return [{"ref": ref} | ({"played_ms": PLAYED_MS} if index == INTERRUPTED else {}) for index, ref in enumerate(references)]


def as_codes(references: list[str], cut: bool = True) -> list[dict]:
    """The same turns sent explicitly: text, speaker and codes, the interrupted one's cut to what was played."""
    turns = []
    for index, reference in enumerate(references):
        record = opened(reference)
        if cut and index == INTERRUPTED:
            record = dataclasses.replace(record, codes=record.codes[: PLAYED_MS // FRAME_MS])
        turns.append({"text": record.text, "speaker": record.speaker, "codes": record.codes.tolist()})
    return turns


def test_twelve_turns_by_reference_alone_one_interrupted_each_prompt_holding_what_was_said_and_played(gateway: str) -> None:
    references: list[str] = []
    for index in range(TURNS):
        route = ("speech", "generate")[index % 3 == 2]  # both routes give references
        reply = say(gateway, index, by_reference(references), route)
        assert reply["context_used"] == list(range(index))
        record = opened(reply["turn"])
        assert (record.text, record.speaker) == (f"Turn {index}.", index % 2) and 1 < len(record.codes) <= FRAMES_MS // FRAME_MS
        if route == "speech":  # the reference holds the codes of the audio that came
            assert len(reply["audio"]) == 2 * SAMPLES_PER_FRAME * len(record.codes)
        explicit = opened(say(gateway, index, as_codes(references), route)["turn"])
        assert np.array_equal(explicit.codes, record.codes), f"turn {index}: its prompt is not the turns said and played"
        if index == INTERRUPTED + 1:  # the cut mattered: the whole turn in its place gives other codes
            whole = opened(say(gateway, index, as_codes(references, cut=False), route)["turn"])
            assert not np.array_equal(whole.codes, record.codes)
        references.append(reply["turn"])
    # A played_ms of 0 keeps the text alone; past the turn's end, the whole turn.
    silent = [*by_reference(references[:2]), {"ref": references[2], "played_ms": 0}]
    text_only = [*as_codes(references[:2]), {"text": "Turn 2.", "speaker": 0}]
    assert opened(say(gateway, 3, silent)["turn"]).codes.tolist() == opened(say(gateway, 3, text_only)["turn"]).codes.tolist()
    longer = [{"ref": references[0], "played_ms": 10**6}]
    assert say(gateway, 1, longer)["turn"] == say(gateway, 1, by_reference(references[:1]))["turn"]


def test_every_delta_carries_the_turn_so_far_and_a_reply_stopped_mid_stream_goes_back_by_the_last_one(gateway: str) -> None:
    """Each delta's reference is the turn up to it: the request's text and speaker, and codes that
    grow event by event, a prefix of the done event's turn, covering all the audio sent so far. A
    client that stops the reply mid-stream (its request closed) sends the last delta's reference
    with played_ms: the prompt holds the codes generated, cut there, as the explicit codes cut to
    floor(played_ms / 80) frames, and as the whole turn's reference with the same played_ms."""
    body = {"model": "csm-1b", "input": "Turn 5.", "voice": "ash", "response_format": "pcm", "stream_format": "sse", "seed": 5,
            "max_audio_length_ms": 1600}  # fmt: skip
    response = httpx.post(f"{gateway}/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 200, response.text
    *deltas, done = sse_events(response.content)
    whole = opened(done["turn"])
    assert len(deltas) >= 2 and len(whole.codes) > 2, (len(deltas), whole.codes.shape)
    received, frames = 0, []
    for delta in deltas:
        record = opened(delta["turn"])
        received += len(base64.b64decode(delta["audio"])) // 2
        assert (record.text, record.speaker) == ("Turn 5.", 1)
        assert np.array_equal(record.codes, whole.codes[: len(record.codes)]) and len(record.codes) * SAMPLES_PER_FRAME >= received
        frames.append(len(record.codes))
    assert frames == sorted(set(frames)) and frames[-1] == len(whole.codes), frames
    assert received == len(whole.codes) * SAMPLES_PER_FRAME

    # The same reply (its seed), stopped after its first delta: its request closed mid-stream, its
    # reference the turn so far (the chunks' sizes are the server's pacing: a prefix of some length).
    with httpx.stream("POST", f"{gateway}/v1/audio/speech", json=body, timeout=60) as stream:
        first = next(json.loads(line[len("data: ") :]) for line in stream.iter_lines() if line.startswith("data: "))
    assert first["type"] == "speech.audio.delta"
    so_far = opened(first["turn"])
    assert (so_far.text, so_far.speaker) == ("Turn 5.", 1) and np.array_equal(so_far.codes, whole.codes[: len(so_far.codes)])
    assert len(so_far.codes) * SAMPLES_PER_FRAME >= len(base64.b64decode(first["audio"])) // 2 > 0
    cut = deltas[-2]  # a reference short of the whole turn, played all but 50 ms of what had come
    played_ms = sum(len(base64.b64decode(delta["audio"])) // 2 for delta in deltas[: len(deltas) - 1]) * 1000 // 24_000 - 50
    kept = played_ms // FRAME_MS
    assert 0 < kept < len(opened(cut["turn"]).codes), (played_ms, frames)
    explicit = [{"text": "Turn 5.", "speaker": 1, "codes": whole.codes[:kept].tolist()}]
    expected = opened(say(gateway, 6, explicit)["turn"]).codes
    for stopped in ({"ref": cut["turn"], "played_ms": played_ms}, {"ref": done["turn"], "played_ms": played_ms}):
        assert np.array_equal(opened(say(gateway, 6, [stopped])["turn"]).codes, expected), stopped
    assert not np.array_equal(opened(say(gateway, 6, [{"ref": cut["turn"]}])["turn"]).codes, expected)  # the cut mattered


def test_a_reference_opens_on_any_replica_that_shares_the_key_and_a_forged_one_on_none(gateway: str, config: GatewayConfig) -> None:
    first = say(gateway, 0, [])["turn"]
    second = say(gateway, 1, [{"ref": first}], "generate")["turn"]
    context = by_reference([first, second])
    with running(dataclasses.replace(config, port=free_port())) as replica:
        assert say(replica, 2, context)["turn"] == say(gateway, 2, context)["turn"]
    with running(dataclasses.replace(config, port=free_port(), turn_key="another-key-" + "x" * 32)) as stranger:
        refused = httpx.post(f"{stranger}/generate", json={"text": "Hi.", "context": context}, timeout=60).json()["error"]
        assert refused["param"] == "context" and refused["message"].startswith("context[0].ref: its signature does not match")
    payload, signature = first[5:].split(".")
    for forged in (
        f"csm1.{payload[:-2]}{'AB' if payload[-2:] != 'AB' else 'CD'}.{signature}",  # its codes altered
        sign_turn(b"a guessed key" * 3, "Turn 0.", 0, opened(first).codes),
        f"csm1.{payload}",
        "a" * 40,
    ):
        response = httpx.post(f"{gateway}/generate", json={"text": "Hi.", "context": [{"ref": second}, {"ref": forged}]}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["message"].startswith("context[1].ref: "), response.text


def long_turn(index: int, frames: int) -> str:
    """A turn of an earlier, long part of the conversation, signed with the gateway's key."""
    codes = np.random.default_rng(index).integers(0, 2051, (frames, AUDIO_NUM_CODEBOOKS))
    return sign_turn(KEY.encode(), f"Long turn {index}.", index % 2, codes)


def test_a_conversation_longer_than_the_prompt_goes_on_under_drop_oldest_with_the_voice_pinned(gateway: str) -> None:
    """Six turns of 375 frames overfill the tiny model's 2048 positions: refused by default; under
    drop_oldest the oldest go and the voice's 12 s reference clip stays, taking its room: one turn
    fewer fits than beside a voice without a clip, and the reply is the one that the clip and the
    turns used give."""
    client = httpx.Client(base_url=gateway, timeout=60)
    form = {"name": "pinned", "consent": "cons_1", "transcript": "A long hum.", "speaker": "0"}
    clip = {"audio_sample": ("pinned.wav", wav_bytes(tone(12.0)), "audio/wav")}  # 150 frames
    voice = client.post("/v1/audio/voices", data=form, files=clip).json()["id"]
    speech = {"model": "csm-1b", "voice": voice, "response_format": "pcm", "stream_format": "sse", "seed": 1}

    def reply(**body) -> dict:
        response = client.post("/v1/audio/speech", json={**speech, "max_audio_length_ms": FRAMES_MS, **body})
        assert response.status_code == 200, response.text
        return sse_events(response.content)[-1]

    references = [long_turn(index, MAX_FRAMES) for index in range(6)]
    refused = client.post("/v1/audio/speech", json={**speech, "input": "Too long.", "context": [{"ref": ref} for ref in references]})
    assert refused.status_code == 400 and "prompt positions" in refused.json()["error"]["message"], refused.text
    for index in range(3):  # each reply joins the conversation
        line, context = f"Still answered {index}.", [{"ref": ref} for ref in references]
        done = reply(input=line, context=context, context_overflow="drop_oldest")
        used = done["context_used"]
        assert used == list(range(used[0], len(references))) and used[0] >= 1, used
        bare = reply(input=line, context=context, context_overflow="drop_oldest", voice="alloy")  # speaker 0 too, no clip
        assert bare["context_used"] == list(range(used[0] - 1, len(references)))
        pinned = reply(input=line, context=[{"ref": references[turn]} for turn in used])  # the clip, then the turns used
        assert pinned["turn"] == done["turn"] and pinned["context_used"] == list(range(len(used)))
        references.append(done["turn"])
    assert client.delete(f"/v1/audio/voices/{voice}").json()["deleted"]
