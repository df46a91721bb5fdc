"""Generated values for every input of `csm` (unary gRPC and HTTP) and `csm_stream` (gRPC
streaming) in a real tritonserver: wrong datatypes and ranks, empty and huge tensors, NaN and
infinity, extreme integers, invalid UTF-8, any sample rate, context codes out of range or not
matching their lengths, VOICE names and paths that are no voice, CONTEXT_OVERFLOW modes that are
none, CONTEXT_PINNED past the context, turn references that are none or do not match their
segments. Only INVALID_ARG errors that name an input come back,
each within seconds; valid requests succeed; the model's memory stays bounded and a seeded request
gives the same codes after the fuzzing as before."""

from __future__ import annotations

import logging
import queue
import random
import re
import time
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_triton_stream import stream_model_processes, wait_for_idle_server
from tritonclient.utils import InferenceServerException

from csm_client.contract import CONTEXT_OVERFLOW_MODES, INPUTS, STANDARD_SAMPLE_RATES
from csm_triton.tools.server import TritonServer
from triton_tensors import request, scalar, tensors, vector

pytestmark = pytest.mark.server

logger = logging.getLogger(__name__)

ANSWER_S = 20.0  # the longest any answer may take: generous, the machine is shared
TRANSPORTS = ("grpc", "http", "stream")
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
# An input named in a message: ours start with it, Triton's own quote it (input 'TEXT').
NAMED = re.compile(r"^(" + "|".join(sorted(INPUTS, key=len, reverse=True)) + r"|prompt)\b|input '\w+'|input\(s\) \['\w+'")

texts = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(str.strip).map(str.encode)


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """Requests within every limit, kept short so that they run fast."""
    arrays = request(draw(texts), draw(st.integers(0, 9)), MAX_AUDIO_LENGTH_MS=scalar(draw(st.integers(80, 240)), np.int32))
    segments = draw(st.integers(0, 2))
    if segments:
        arrays["CONTEXT_TEXT"] = vector(draw(st.lists(texts, min_size=segments, max_size=segments)), object)
        arrays["CONTEXT_SPEAKER"] = vector(draw(st.lists(st.integers(0, 9), min_size=segments, max_size=segments)), np.int32)
        lengths = draw(st.lists(st.integers(0, 1500), min_size=segments, max_size=segments))
        if any(lengths):
            noise = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(-0.5, 0.5, sum(lengths))
            arrays["CONTEXT_AUDIO"] = vector(noise, np.float32)
            arrays["CONTEXT_AUDIO_LENGTHS"] = vector(lengths, np.int32)
            arrays["CONTEXT_SAMPLE_RATE"] = scalar(draw(st.sampled_from(STANDARD_SAMPLE_RATES)), np.int32)
        # A segment without audio may carry codes instead: the AUDIO_CODES of an earlier answer.
        frames = [
            0 if length else count
            for length, count in zip(lengths, draw(st.lists(st.integers(0, 3), min_size=segments, max_size=segments)), strict=True)
        ]
        if any(frames):
            codes = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 2051, sum(frames) * 32)
            arrays["CONTEXT_CODES"] = vector(codes, np.int32)
            arrays["CONTEXT_CODES_LENGTHS"] = vector(frames, np.int32)
    if draw(st.booleans()):  # what to do with a context too long for the prompt, some of it pinned
        arrays["CONTEXT_OVERFLOW"] = scalar(draw(st.sampled_from(CONTEXT_OVERFLOW_MODES)).encode(), object)
        arrays["CONTEXT_PINNED"] = scalar(draw(st.integers(0, segments)), np.int32)
    for name, values, dtype in (
        ("TEMPERATURE", st.floats(0.125, 2.0, width=32), np.float32),
        ("TOPK", st.integers(1, 2051), np.int32),
        ("SEED", INT64, np.int64),
    ):
        if draw(st.booleans()):
            arrays[name] = scalar(draw(values), dtype)
    return arrays


NO_MODES = [b"", b"drop_newest", b"DROP_OLDEST", b"refuse "]  # CONTEXT_OVERFLOW values near its modes
NO_REFERENCES = [b"csm1.", b"csm1.eJwDAAAAAAE." + b"A" * 43, b"csm1." + b"A" * 40_000 + b"." + b"A" * 43]  # CONTEXT_TURN near references
# Values out of bounds or of no meaning, by input; a valid MAX_AUDIO_LENGTH_MS is never drawn
# here, so that no request generates for long.
BAD_VALUES = {
    "TEXT": st.one_of(st.binary(max_size=40), st.sampled_from([b"", b" \n", b"x" * 5000, b"Look <|image|>"])).map(lambda v: [[v]]),
    "SPEAKER": INT32.map(lambda v: [[v]]),
    "CONTEXT_TEXT": st.lists(st.binary(max_size=20), max_size=40).map(lambda v: [v]),
    "CONTEXT_SPEAKER": st.lists(INT32, max_size=4).map(lambda v: [v]),
    "CONTEXT_AUDIO": st.lists(st.floats(width=32), max_size=40).map(lambda v: [v]),
    "CONTEXT_AUDIO_LENGTHS": st.lists(INT32, max_size=4).map(lambda v: [v]),
    "CONTEXT_SAMPLE_RATE": st.one_of(st.integers(1, 2**31 - 1), INT32).map(lambda v: [[v]]),
    "CONTEXT_CODES": st.one_of(st.lists(INT32, max_size=70), st.lists(st.integers(0, 2051), min_size=32, max_size=96)).map(lambda v: [v]),
    "CONTEXT_CODES_LENGTHS": st.lists(st.one_of(INT32, st.integers(0, 3)), max_size=4).map(lambda v: [v]),
    "TEMPERATURE": st.floats(width=32).map(lambda v: [[v]]),
    "TOPK": INT32.map(lambda v: [[v]]),
    "MAX_AUDIO_LENGTH_MS": st.one_of(st.integers(-(2**31), 79), st.integers(30_001, 2**31 - 1)).map(lambda v: [[v]]),
    "SEED": INT64.map(lambda v: [[v]]),
    "FIRST_CHUNK_FRAMES": INT32.map(lambda v: [[v]]),
    "CHUNK_FRAMES": INT32.map(lambda v: [[v]]),
    "VOICE": st.one_of(st.binary(max_size=20), st.sampled_from([b"../csm_stream/config.pbtxt", b"/etc/passwd", b""])).map(lambda v: [[v]]),
    "CONTEXT_OVERFLOW": st.one_of(st.binary(max_size=20), st.sampled_from(NO_MODES)).map(lambda v: [[v]]),
    # More than the segments a valid request has (two at most), or fewer than none.
    "CONTEXT_PINNED": st.one_of(st.integers(-(2**31), -1), st.integers(3, 2**31 - 1)).map(lambda v: [[v]]),
    "CONTEXT_TURN": st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(NO_REFERENCES)), max_size=4).map(lambda v: [v]),
    "CONTEXT_PLAYED_MS": st.lists(INT32, max_size=4).map(lambda v: [v]),
}
DTYPES = [object, np.int32, np.int64, np.float32, np.float64, np.float16, np.uint8, np.bool_]


def retyped(array: np.ndarray, dtype) -> np.ndarray:
    if dtype is object:
        return np.full(array.shape, b"1", dtype=object)
    return np.zeros(array.shape, dtype=dtype)


OUTPUT_CHOICES = [["AUDIO_CODES"], ["AUDIO", "AUDIO_CODES"], ["AUDIO", "AUDIO_CODES", "CONTEXT_DROPPED"], ["AUDIO_CODES", "TURN"]]
KINDS = ["value", "dtype", "rank", "batch of two", "empty", "huge", "missing", "unknown", "non-finite audio"]


@dataclass
class Case:
    arrays: dict[str, np.ndarray]
    valid: bool
    transport: str
    outputs: list[str]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A valid request, or one with one change: a bad value, a wrong datatype or shape, an empty
    or huge tensor, a missing or unknown input; sent by one of the transports."""
    arrays = draw(valid_requests())
    # The transport, the input and the change are picked uniformly, by a generator seeded with the
    # request: hypothesis favours the first of a list, and draws the same few integers again.
    pick = random.Random(repr([draw(st.integers(0, 2**64 - 1)), *((name, array.tolist()) for name, array in sorted(arrays.items()))]))
    transport, outputs = pick.choice(TRANSPORTS), pick.choice(OUTPUT_CHOICES)
    if pick.random() < 0.2:
        return Case(arrays, True, transport, outputs)
    name, kind = pick.choice(sorted(INPUTS)), pick.choice(KINDS)
    if kind == "missing" and name not in arrays or kind == "non-finite audio" and "CONTEXT_AUDIO" not in arrays:
        kind = "value"
    array = arrays.get(name, np.zeros((1, 1), dtype=INPUTS[name].dtype))
    arrays = dict(arrays)
    if kind == "value":
        arrays[name] = np.array(draw(BAD_VALUES[name]), dtype=INPUTS[name].dtype)
    elif kind == "dtype":
        arrays[name] = retyped(array, pick.choice([dtype for dtype in DTYPES if np.dtype(dtype) != INPUTS[name].dtype]))
    elif kind == "rank":
        arrays[name] = pick.choice([array[None], array.reshape(-1), array.reshape(1, 1, -1, 1)])
    elif kind == "batch of two":
        arrays[name] = np.concatenate([array, array])
    elif kind == "empty":
        arrays[name] = np.zeros((1, 0), dtype=array.dtype)
    elif kind == "huge":  # a few MB, or past max_request_bytes (32 MiB); BYTES as one long element
        size = pick.choice([1 << 20, 9 << 20])
        if INPUTS[name].dtype == object:
            arrays[name] = np.array([[b"x" * size * 4]], dtype=object)
        else:
            arrays[name] = np.zeros((1, size), dtype=INPUTS[name].dtype)
    elif kind == "missing" and name != "MAX_AUDIO_LENGTH_MS":  # its default, 10 s, would take long
        del arrays[name]
    elif kind == "unknown":
        arrays["STYLE"] = scalar(1, np.int32)
    elif kind == "non-finite audio":
        audio = arrays["CONTEXT_AUDIO"].copy()
        audio[0, pick.randrange(audio.shape[1])] = pick.choice([np.nan, np.inf, -np.inf])
        arrays["CONTEXT_AUDIO"] = audio
    return Case(arrays, False, transport, outputs)


def send(server: TritonServer, transport: str, arrays: dict[str, np.ndarray], outputs: list[str]) -> Exception | None:
    """One request to `csm` over gRPC or HTTP, or to `csm_stream` over gRPC streaming: None when
    it succeeded, else the error. Fails the test if no answer comes within ANSWER_S."""
    if transport == "stream":
        return _stream(server, arrays, outputs)
    arrays = {name: array for name, array in arrays.items() if name not in ("FIRST_CHUNK_FRAMES", "CHUNK_FRAMES")}
    module = grpcclient if transport == "grpc" else httpclient
    try:
        if transport == "grpc":
            client = grpcclient.InferenceServerClient(server.grpc_url)
            client.infer("csm", tensors(module, arrays), outputs=[module.InferRequestedOutput(o) for o in outputs], client_timeout=ANSWER_S)
        else:
            client = httpclient.InferenceServerClient(server.http_url, network_timeout=ANSWER_S)
            client.infer("csm", tensors(module, arrays), outputs=[module.InferRequestedOutput(o) for o in outputs])
    except InferenceServerException as error:
        return error
    finally:
        client.close()
    return None


def _stream(server: TritonServer, arrays: dict[str, np.ndarray], outputs: list[str]) -> Exception | None:
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(
            "csm_stream",
            tensors(grpcclient, arrays),
            outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
            enable_empty_final_response=True,
        )
        while True:
            result, error = answers.get(timeout=ANSWER_S)
            if error is not None:
                return error
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
    finally:
        client.stop_stream()
        client.close()


def check_answer(transport: str, error: Exception | None, seconds: float) -> None:
    message = "success" if error is None else error.message() if isinstance(error, InferenceServerException) else str(error)
    logger.info("%s in %.2f s: %.200s", transport, seconds, message)
    assert seconds < ANSWER_S
    if error is None:
        return
    assert NAMED.search(message), f"{transport}: an error that names no input: {message}"
    if transport != "stream":  # a stream's errors carry no status code
        assert error.status() in ("StatusCode.INVALID_ARGUMENT", "400"), f"{transport}: {error.status()}: {message}"


def csm_stream_rss(server: TritonServer) -> int:
    """Resident bytes of csm_stream's stub and engine processes together."""
    return sum(process.memory_info().rss for process in stream_model_processes(server))


def reference_codes(server: TritonServer) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    arrays = request("The same before and after.", 1, SEED=scalar(77, np.int64))
    return client.infer("csm", tensors(grpcclient, arrays)).as_numpy("AUDIO_CODES")[0]


@pytest.fixture(scope="module")
def before_fuzzing(triton_server: TritonServer):
    """The codes of a seeded request and the model process's memory before any fuzzing."""
    codes = reference_codes(triton_server)
    wait_for_idle_server(triton_server)
    return codes, csm_stream_rss(triton_server)


FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every run, CI's included
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: every step of it would be a server call
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(case=cases())
def test_every_answer_is_a_success_or_an_invalid_arg_naming_an_input(triton_server: TritonServer, before_fuzzing, case: Case) -> None:
    start = time.monotonic()
    error = send(triton_server, case.transport, case.arrays, case.outputs)
    check_answer(case.transport, error, time.monotonic() - start)
    if case.valid:
        assert error is None, f"{case.transport}: a valid request failed: {error}"


@settings(FUZZ, max_examples=60)
@given(
    sample_rate=st.one_of(st.integers(1, 2**31 - 1), st.integers(8000, 48_000), st.sampled_from(STANDARD_SAMPLE_RATES)),
    samples=st.integers(1, 4000),
    transport=st.sampled_from(TRANSPORTS),
)
def test_any_context_sample_rate_is_answered_at_once(
    triton_server: TritonServer, before_fuzzing, sample_rate: int, samples: int, transport: str
) -> None:
    arrays = request(
        CONTEXT_TEXT=vector([b"Earlier."], object),
        CONTEXT_SPEAKER=vector([0], np.int32),
        CONTEXT_AUDIO=vector(np.random.default_rng(samples).uniform(-0.5, 0.5, samples), np.float32),
        CONTEXT_AUDIO_LENGTHS=vector([samples], np.int32),
        CONTEXT_SAMPLE_RATE=scalar(sample_rate, np.int32),
    )
    start = time.monotonic()
    error = send(triton_server, transport, arrays, ["AUDIO_CODES"])
    check_answer(transport, error, time.monotonic() - start)
    if error is not None:
        assert error.message().startswith("CONTEXT_SAMPLE_RATE: "), error.message()
    assert error is None or sample_rate not in STANDARD_SAMPLE_RATES


def test_the_server_is_unchanged_after_the_fuzzing(triton_server: TritonServer, before_fuzzing) -> None:
    codes, memory_before = before_fuzzing
    wait_for_idle_server(triton_server, timeout_s=60)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    assert client.is_server_ready() and client.is_model_ready("csm") and client.is_model_ready("csm_stream")
    # Requests of up to 36 MB passed through: Triton's shared memory with the model grows to hold them.
    assert csm_stream_rss(triton_server) - memory_before < 400 * 2**20
    assert np.array_equal(reference_codes(triton_server), codes)
