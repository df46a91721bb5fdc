"""Recovery from a dead csm_stream process under `make serve` itself, as a user meets it: its stub
killed (what the OOM killer does) with requests in flight through csm, through the gateway and
straight to csm_stream, twice in a row in the same server. Each request in flight ends with an
error within seconds, the gateway's /health tells that csm_stream cannot serve, and csm_stream
serves the same seeded request with the same codes again within 30 s of each kill."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from csm_client import CSMClient
from make_serve import MakeServe

pytestmark = pytest.mark.server

LONG = {"max_audio_length_ms": 20_000}  # 250 frames: far longer than the test waits for
SEEDED = {"max_audio_length_ms": 400, "seed": 11}
END_WITHIN_S = 15.0
SERVE_WITHIN_S = 30.0


@dataclass
class InFlight:
    """One request on a thread of its own: when it got its first audio, and how and when it ended."""

    name: str
    run: Callable[[InFlight], None]
    first_audio: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> InFlight:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self.run(self)
        except BaseException as error:  # what ended it is the result
            self.error = error
        self.ended_at = time.monotonic()


def through_csm(server: MakeServe) -> Callable[[InFlight], None]:
    def run(request: InFlight) -> None:
        with CSMClient(server.grpc_url, model_name="csm") as client:
            request.first_audio.set()  # a unary call shows none: it is in flight once sent
            client.generate("Through the unary front.", 0, **LONG)

    return run


def through_the_gateway(server: MakeServe) -> Callable[[InFlight], None]:
    def run(request: InFlight) -> None:
        body = {"model": "csm-1b", "input": "Through the gateway.", "voice": "alloy", "response_format": "pcm", **LONG}
        with httpx.stream("POST", f"{server.gateway_url}/v1/audio/speech", json=body, timeout=120) as response:
            response.raise_for_status()
            for _ in response.iter_bytes():
                request.first_audio.set()

    return run


def straight_to_csm_stream(server: MakeServe) -> Callable[[InFlight], None]:
    def run(request: InFlight) -> None:
        with CSMClient(server.grpc_url) as client:
            for _ in client.stream("Straight to csm_stream.", 0, **LONG):
                request.first_audio.set()

    return run


def seeded_codes(server: MakeServe) -> np.ndarray:
    with CSMClient(server.grpc_url, model_name="csm") as client:
        return client.generate_codes("The same codes again.", 1, **SEEDED)


def test_a_killed_csm_stream_stub_ends_what_it_had_and_csm_stream_serves_again_twice(make_serve: MakeServe) -> None:
    expected = seeded_codes(make_serve)
    for kill in (1, 2):
        requests = [
            InFlight(name, run(make_serve)).start()
            for name, run in (("csm", through_csm), ("gateway", through_the_gateway), ("csm_stream", straight_to_csm_stream))
        ]
        for request in requests:
            assert request.first_audio.wait(60), f"kill {kill}: {request.name} got no audio: {request.error!r}"
        time.sleep(0.5)
        assert all(request.ended_at is None for request in requests), [(r.name, r.error) for r in requests]
        make_serve.stub("csm_stream").kill()
        killed = time.monotonic()

        for request in requests:
            request.thread.join(END_WITHIN_S)
            assert request.ended_at is not None, f"kill {kill}: {request.name} still in flight {END_WITHIN_S:.0f} s after the kill"
            assert request.error is not None, f"kill {kill}: {request.name} ended without an error"
        assert max(request.ended_at for request in requests) - killed < END_WITHIN_S
        lost = {request.name: str(request.error) for request in requests}
        assert "this request was lost" in lost["csm"] and "this stream was lost" in lost["csm_stream"], lost

        unhealthy = None
        while unhealthy is None and time.monotonic() - killed < 10:
            health = httpx.get(f"{make_serve.gateway_url}/health", timeout=10)
            unhealthy = health.json() if health.status_code == 503 else None
            time.sleep(0.1)
        assert unhealthy is not None, f"kill {kill}: the gateway's /health never said csm_stream could not serve"

        while True:
            try:
                codes = seeded_codes(make_serve)
                break
            except Exception as error:
                assert time.monotonic() - killed < SERVE_WITHIN_S, (
                    f"kill {kill}: csm_stream not serving {SERVE_WITHIN_S:.0f} s after: {error}"
                )
                time.sleep(0.5)
        assert np.array_equal(codes, expected), f"kill {kill}: the seeded request's codes changed"
        assert time.monotonic() - killed < SERVE_WITHIN_S
        print(f"kill {kill}: in flight ended {max(r.ended_at for r in requests) - killed:.1f} s after, served again after "
              f"{time.monotonic() - killed:.1f} s")  # fmt: skip
    assert make_serve.log().count("serves again: reloaded and served a request") >= 2
