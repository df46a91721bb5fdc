"""The gateway's share of bench/soak.py: speech in every response_format and speed, custom voices
created, used and deleted, hostile bodies, and clients that go away mid-stream, each one request
over HTTP whose outcome the soak counts as it counts its gRPC requests.

Outcomes: `completed` (a 200 and its whole body), `invalid` (a hostile body refused with a 4xx and
OpenAI's error body), `dropped` (the client left after its first audio bytes), `unexpected`
(anything else: a 5xx above all) and `lost` (no answer within the bound).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import soundfile

from csm_client.contract import SAMPLE_RATE

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
SPEEDS = (0.5, 1.0, 1.5, 4.0)
TEXTS = ("Hello there.", "The weather is lovely today, isn't it?", "Let me tell you a short story about a lighthouse keeper.")


def clip(seconds: float, rate: int = SAMPLE_RATE, rng: random.Random | None = None) -> bytes:
    """A WAV clip of a gliding tone with a little noise: something to use as a voice's reference."""
    generator = np.random.default_rng((rng or random.Random(0)).getrandbits(32))
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * (180 + 40 * t) * t) + 0.01 * generator.standard_normal(len(t))
    out = io.BytesIO()
    soundfile.write(out, samples.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def lying_wav(rate: int, declared_frames: int, real_frames: int) -> bytes:
    """A 16-bit mono WAV whose header declares `rate` and `declared_frames`, with only `real_frames` of data."""
    data = np.zeros(real_frames, "<i2").tobytes()
    size = 2 * declared_frames
    header = b"RIFF" + (36 + size).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
    header += (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little") + (2 * rate).to_bytes(4, "little")
    header += (2).to_bytes(2, "little") + (16).to_bytes(2, "little") + b"data" + size.to_bytes(4, "little")
    return header + data


def speech_body(text: str, **fields: object) -> dict:
    return {"model": "csm-1b", "input": text, "voice": "alloy", "max_audio_length_ms": 800, **fields}


def context_with(audio: bytes) -> dict:
    return speech_body("After a turn.", context=[{"text": "An earlier turn.", "speaker": 1, "audio": base64.b64encode(audio).decode()}])


# Bodies a hostile or careless client sends to POST /v1/audio/speech (raw bytes, or JSON): each must
# be refused with a 4xx and OpenAI's error body.
HOSTILE: dict[str, Callable[[], bytes]] = {
    "not json": lambda: b"{not json",
    "nested 3000 deep": lambda: b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "lone surrogate": lambda: json.dumps(speech_body("\ud800")).encode(),
    "topk 2^63": lambda: json.dumps(speech_body("Hi.", topk=2**63)).encode(),
    "topk 2^32 + 5": lambda: json.dumps(speech_body("Hi.", topk=2**32 + 5)).encode(),
    "speaker 2^32 in context": lambda: json.dumps(speech_body("Hi.", context=[{"text": "x", "speaker": 2**32}])).encode(),
    "unknown key": lambda: json.dumps({**speech_body("Hi."), "k" * 10_000: 1}).encode(),
    "newline in a key": lambda: json.dumps({**speech_body("Hi."), "a\nINFO forged": 1}).encode(),
    "blank input": lambda: json.dumps(speech_body("   ")).encode(),
    "unknown voice": lambda: json.dumps({**speech_body("Hi."), "voice": "nobody"}).encode(),
    "bad base64 audio": lambda: json.dumps(speech_body("Hi.", context=[{"text": "x", "speaker": 0, "audio": "!!"}])).encode(),
    "ffconcat script": lambda: json.dumps(context_with(b"ffconcat version 1.0\nfile 'README.md'\n")).encode(),
    "m3u8 playlist": lambda: json.dumps(context_with(b"#EXTM3U\n#EXTINF:10,\nREADME.md\n")).encode(),
    "wav at 1 Hz": lambda: json.dumps(context_with(lying_wav(1, 1000, 1000))).encode(),
    "wav at 2^31-1 Hz": lambda: json.dumps(context_with(lying_wav(2**31 - 1, 2**30, 1000))).encode(),
    "wav at 655350 Hz": lambda: json.dumps(context_with(lying_wav(655_350, 655_350 * 160, 4800))).encode(),
    "truncated wav": lambda: json.dumps(context_with(clip(1.0)[:30])).encode(),
}


@dataclass
class GatewayUser:
    """One virtual user's HTTP client of the gateway, and the key that creating voices takes."""

    client: httpx.Client
    voices_key: str
    bound_s: float
    rng: random.Random

    def speech(self) -> tuple[str, str | None]:
        body = speech_body(self.rng.choice(TEXTS), response_format=self.rng.choice(FORMATS), speed=self.rng.choice(SPEEDS))
        return self._spoken(body)

    def voice(self) -> tuple[str, str | None]:
        """A custom voice created from a clip, spoken with, then deleted: three requests, one outcome."""
        name = f"soak-{self.rng.getrandbits(40):x}"
        files = {"audio_sample": ("clip.wav", clip(2.0, rng=self.rng), "audio/wav")}
        form = {"name": name, "consent": "cons_soak", "transcript": "A clip made for the soak."}
        headers = {"Authorization": f"Bearer {self.voices_key}"}
        try:
            created = self.client.post("/v1/audio/voices", data=form, files=files, headers=headers, timeout=self.bound_s)
            if created.status_code != 200:
                return "unexpected", f"create voice: {created.status_code} {created.text[:200]}"
            voice_id = created.json()["id"]
            outcome = self._spoken(speech_body(self.rng.choice(TEXTS), voice={"id": voice_id}, response_format="pcm"))
            deleted = self.client.delete(f"/v1/audio/voices/{voice_id}", headers=headers, timeout=self.bound_s)
        except httpx.TimeoutException as error:
            return "lost", f"voice: {error!r}"
        except httpx.HTTPError as error:
            return "unexpected", f"voice: {error!r}"
        if deleted.status_code != 200:
            return "unexpected", f"delete voice: {deleted.status_code} {deleted.text[:200]}"
        return outcome

    def hostile(self) -> tuple[str, str | None]:
        name = self.rng.choice(list(HOSTILE))
        try:
            answer = self.client.post(
                "/v1/audio/speech", content=HOSTILE[name](), headers={"Content-Type": "application/json"}, timeout=self.bound_s
            )
        except httpx.TimeoutException as error:
            return "lost", f"hostile {name}: {error!r}"
        except httpx.HTTPError as error:
            return "unexpected", f"hostile {name}: {error!r}"
        try:
            error_body = answer.json()["error"]
        except (ValueError, KeyError, TypeError):
            error_body = None
        if 400 <= answer.status_code < 500 and isinstance(error_body, dict) and error_body.get("message"):
            return "invalid", None
        return "unexpected", f"hostile {name}: {answer.status_code} {answer.text[:200]}"

    def disconnect(self) -> tuple[str, str | None]:
        """A stream whose client goes away at its first audio bytes."""
        body = speech_body(self.rng.choice(TEXTS), response_format=self.rng.choice(FORMATS), max_audio_length_ms=4000)
        try:
            with self.client.stream("POST", "/v1/audio/speech", json=body, timeout=self.bound_s) as response:
                if response.status_code != 200:
                    return "unexpected", f"disconnect: {response.status_code}"
                for data in response.iter_raw():
                    if data:
                        return "dropped", None  # leaving the block closes the connection
        except httpx.TimeoutException as error:
            return "lost", f"disconnect: {error!r}"
        except httpx.HTTPError as error:
            return "unexpected", f"disconnect: {error!r}"
        return "completed", None  # the whole answer came before the client could leave

    def _spoken(self, body: dict) -> tuple[str, str | None]:
        try:
            with self.client.stream("POST", "/v1/audio/speech", json=body, timeout=self.bound_s) as response:
                data = b"".join(response.iter_raw())
        except httpx.TimeoutException as error:
            return "lost", f"speech: {error!r}"
        except httpx.HTTPError as error:  # a stream cut before its end
            return "unexpected", f"speech {body.get('response_format')}: {error!r}"
        if response.status_code != 200 or not data:
            return "unexpected", f"speech: {response.status_code} {data[:200]!r}"
        return "completed", None


KINDS: dict[str, Callable[[GatewayUser], tuple[str, str | None]]] = {
    "gateway_speech": GatewayUser.speech,
    "gateway_voice": GatewayUser.voice,
    "gateway_hostile": GatewayUser.hostile,
    "gateway_disconnect": GatewayUser.disconnect,
}


def start_gateway(triton_grpc_url: str, port: int, voices_key: str, log_file: Path) -> subprocess.Popen:
    """`python -m gateway` in a process of its own (so its memory is watched apart), with a voices key."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CSM_GATEWAY_")}
    env["CSM_GATEWAY_VOICE_KEYS"] = voices_key
    argv = [sys.executable, "-m", "gateway", "--port", str(port), "--triton-url", triton_grpc_url, "--host", "127.0.0.1"]
    with open(log_file, "w") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start (log: {log_file})")
        time.sleep(0.5)
