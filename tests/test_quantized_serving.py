"""Quantized CSM through a real tritonserver: csm_stream's `quantize` parameter (bf16 at load), and a
directory staged by `python -m export quantize` (int8, "auto") served with the compiled CPU frame
step. Each serves unary requests over gRPC and HTTP and streams that join and leave a running
batch, with the codes the in-process generator of the same scheme gives each request alone, and
not the unquantized model's: the scheme took effect. (The in-process generator of the compiled
server is compiled too: compiled and eager int8 may round differently, test_quantize.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from test_triton_stream import Streams

from conftest import tiny_server
from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton import Generator, load_csm_1b
from csm_triton.tools.server import TritonServer
from export.quantize import quantize_staged
from triton_tensors import request, scalar, tensors

pytestmark = pytest.mark.server

SLOTS = 4
# (text, speaker, max_audio_length_ms, seed): a long stream, then two that join it and leave first.
ASKS = (("A long answer that the others join.", 0, 4000, 1), ("Short.", 1, 640, 2), ("A middle one.", 0, 1600, 3))


@dataclass
class Served:
    server: TritonServer
    generator: Generator  # in process, the same scheme on the same weights


@pytest.fixture(scope="module", params=["bf16", "int8-staged-compiled"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "bf16":
        parameters, generator = {"quantize": "bf16"}, load_csm_1b(tiny_model_dir, device="cpu", slots=SLOTS, quantize="bf16")
    else:
        staged = quantize_staged(tiny_model_dir, root / "tiny-int8")
        # Compiled in process too: the compiled and eager paths may round differently (test_quantize.py).
        parameters, generator = {"model_dir": str(staged), "compile": "on"}, load_csm_1b(staged, device="cpu", slots=SLOTS, compile=True)
    try:
        with tiny_server(root, tiny_model_dir, SLOTS, models={"csm_stream": parameters}) as server:
            yield Served(server, generator)
    finally:
        generator.close()


def alone(generator: Generator, text: str, speaker: int, max_audio_length_ms: int, seed: int) -> np.ndarray:
    return generator.generate_codes(text, speaker, [], max_audio_length_ms=max_audio_length_ms, seed=seed).numpy()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unary_requests_give_the_schemes_codes(served: Served, generator: Generator, protocol: str) -> None:
    module, url = (grpcclient, served.server.grpc_url) if protocol == "grpc" else (httpclient, served.server.http_url)
    client = module.InferenceServerClient(url)
    arrays = request("Quantized, and served.", 1, MAX_AUDIO_LENGTH_MS=scalar(800, np.int32))
    result = client.infer("csm", tensors(module, arrays), outputs=[module.InferRequestedOutput("AUDIO_CODES")])
    codes = result.as_numpy("AUDIO_CODES")[0]
    assert np.array_equal(codes, alone(served.generator, "Quantized, and served.", 1, 800, 3))
    assert not np.array_equal(codes, alone(generator, "Quantized, and served.", 1, 800, 3))  # conftest's: unquantized


def test_streams_joining_and_leaving_a_batch_give_each_ones_codes_alone(served: Served) -> None:
    streams = Streams(served.server)
    try:
        names = [f"s{index}" for index in range(len(ASKS))]
        for index, (name, (text, speaker, length_ms, seed)) in enumerate(zip(names, ASKS, strict=True)):
            streams.send(name, request(text, speaker, MAX_AUDIO_LENGTH_MS=scalar(length_ms, np.int32), SEED=scalar(seed, np.int64)))
            while index == 0 and not streams.received[name].chunks:  # the others join a running stream
                streams.pump()
        streams.run_until_done(names)
    finally:
        streams.close()
    finished = {name: streams.received[name] for name in names}
    assert max(finished, key=lambda name: finished[name].start + finished[name].arrivals[-1]) == "s0"  # the others left first
    for name, ask in zip(names, ASKS, strict=True):
        received = finished[name]
        assert received.error is None, received.error
        codes = alone(served.generator, *ask)
        assert np.array_equal(np.concatenate(received.codes), codes), name
        assert len(received.audio) == len(codes) * SAMPLES_PER_FRAME
