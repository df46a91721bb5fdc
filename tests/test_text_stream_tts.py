"""The "text_stream_tts" model in a real tritonserver, with fake_llm (tests/model_repository) in place
of an LLM: speech starts before the text is complete, each sentence sounds as csm_stream makes it
alone, and bad inputs, a failing LLM and a cancelling client end their request alone."""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from test_context_overflow import CONVERSATION
from test_metrics import scrape, series, settled
from test_model_control import stubs
from test_triton_stream import wait_for_idle_server

from conftest import tiny_server
from csm_client.segment import context_arrays
from csm_triton.tools.server import TritonServer
from csm_triton.triton.sentences import split_sentences
from triton_tensors import scalar, tensors, vector

pytestmark = pytest.mark.server

MODEL = "text_stream_tts"
FAKE_LLM = Path(__file__).parent / "model_repository" / "fake_llm"
WORD_DELAY_MS = 100  # the fake LLM's pace, one word per response
STREAM_TIMEOUT_S = 8
MAX_SENTENCE_CHARS = 150  # config.pbtxt's
# Asks Triton to end a stream with the request's gRPC status (INVALID_ARGUMENT, ...).
STATUS_HEADERS = {"triton_grpc_error": "true"}
SEED = 11
STORY = (
    "The sun rose over the hills. Birds began to sing. A farmer walked slowly to his field. "
    "His old dog ran close behind him. The morning air was cool and fresh. Nobody said a word. "
    "Work would begin soon enough."
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    """tritonserver with csm_stream on the tiny model, text_stream_tts, and fake_llm as its text model."""
    text_stream_tts = {
        "text_model": "fake_llm",
        "text_model_inputs": json.dumps({"sampling_parameters": {"word_delay_ms": WORD_DELAY_MS}}),
        "stream_timeout_s": str(STREAM_TIMEOUT_S),
    }
    root = tmp_path_factory.mktemp("text-stream-tts")
    with tiny_server(root, tiny_model_dir, 2, models={MODEL: text_stream_tts}, extra_models=[FAKE_LLM]) as server:
        yield server


@dataclass
class Stream:
    """What one streaming request got: each response's arrays and arrival time (seconds after the
    request was sent), then the final flag or an error."""

    responses: list[dict[str, np.ndarray]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    error: Exception | None = None
    end: float = 0.0

    def sentences(self) -> list[tuple[str, dict[str, np.ndarray], float]]:
        """(sentence, its outputs with the chunks joined, arrival of its first chunk), in order,
        told apart by the TEXT captions."""
        spoken: list[tuple[str, dict[str, list[np.ndarray]], float]] = []
        for arrays, arrival in zip(self.responses, self.arrivals, strict=True):
            caption = arrays["TEXT"][0, 0].decode()
            if not spoken or spoken[-1][0] != caption:
                spoken.append((caption, {}, arrival))
            for name in ("AUDIO", "AUDIO_CODES"):
                spoken[-1][1].setdefault(name, []).append(arrays[name][0])
        return [(caption, {name: np.concatenate(parts) for name, parts in chunks.items()}, first) for caption, chunks, first in spoken]


def stream(
    server: TritonServer, model: str, arrays: dict[str, np.ndarray], cancel_after: int | None = None, outputs: tuple[str, ...] = ()
) -> Stream:
    """One request on its own gRPC stream, read to its end or cancelled after `cancel_after`
    responses; `outputs` asks for some outputs only."""
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((time.monotonic(), result, error)), headers=STATUS_HEADERS)
    received = Stream()
    start = time.monotonic()
    wanted = [grpcclient.InferRequestedOutput(name) for name in outputs] or None
    client.async_stream_infer(model, tensors(grpcclient, arrays), outputs=wanted, enable_empty_final_response=True)
    try:
        while True:
            arrival, result, error = events.get(timeout=120)
            received.end = arrival - start
            if error is not None:
                received.error = error
                return received
            response = result.get_response()
            if response.outputs:  # csm_stream's final response has the last chunk; text_stream_tts's is empty
                received.responses.append({output.name: result.as_numpy(output.name) for output in response.outputs})
                received.arrivals.append(arrival - start)
            if response.parameters["triton_final_response"].bool_param:
                return received
            if len(received.responses) == cancel_after:
                client.stop_stream(cancel_requests=True)
                return received
    finally:
        client.stop_stream()
        client.close()


def speech_inputs(**extra: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs text_stream_tts passes on to csm_stream: short sentences in small chunks."""
    return {
        "SPEAKER": scalar(1, np.int32),
        "MAX_AUDIO_LENGTH_MS": scalar(320, np.int32),
        "FIRST_CHUNK_FRAMES": scalar(1, np.int32),
        "CHUNK_FRAMES": scalar(2, np.int32),
        "SEED": scalar(SEED, np.int64),
        **extra,
    }


def prompt(text: str) -> np.ndarray:
    return np.array([[text.encode()]], dtype=object)


@pytest.fixture(scope="module")
def story(server: TritonServer) -> Stream:
    spoken = stream(server, MODEL, speech_inputs(PROMPT=prompt(STORY)))
    assert spoken.error is None
    return spoken


def test_speech_starts_before_the_llm_has_written_its_last_word(story: Stream) -> None:
    sentences = story.sentences()
    assert [caption for caption, _, _ in sentences] == split_sentences(STORY, MAX_SENTENCE_CHARS, final=True)[0]
    # The fake LLM sends word i (from 1) no sooner than i word delays after the request came.
    last_word_s = len(STORY.split()) * WORD_DELAY_MS / 1000
    assert sentences[0][2] < last_word_s
    # And its pace was real: the last sentence, complete only with the last word, came after it.
    assert sentences[-1][2] >= last_word_s


def joined(spoken: Stream, name: str) -> np.ndarray:
    return np.concatenate([arrays[name][0] for arrays in spoken.responses])


def test_each_sentence_is_what_csm_stream_makes_of_it_alone_with_seed_plus_its_index(server: TritonServer, story: Stream) -> None:
    sentences = story.sentences()
    for index, (sentence, outputs, _) in enumerate(sentences):
        alone = stream(server, "csm_stream", speech_inputs(TEXT=prompt(sentence), SEED=scalar(SEED + index, np.int64)))
        assert alone.error is None
        assert np.array_equal(outputs["AUDIO_CODES"], joined(alone, "AUDIO_CODES")), sentence
        assert outputs["AUDIO"].shape == joined(alone, "AUDIO").shape
        assert np.abs(outputs["AUDIO"] - joined(alone, "AUDIO")).max() < 1e-4
    # The seed matters, so the comparison above tells SEED + index from SEED.
    sentence, outputs, _ = sentences[1]
    same_seed = stream(server, "csm_stream", speech_inputs(TEXT=prompt(sentence)))
    assert not np.array_equal(outputs["AUDIO_CODES"], joined(same_seed, "AUDIO_CODES"))


def codes_context(codes: np.ndarray) -> dict[str, np.ndarray]:
    """One earlier turn carrying its Mimi codes [frames, 32] (CONTEXT_CODES)."""
    return {
        "CONTEXT_TEXT": vector([b"An earlier turn."], object),
        "CONTEXT_SPEAKER": vector([0], np.int32),
        "CONTEXT_CODES": vector(codes.reshape(-1), np.int32),
        "CONTEXT_CODES_LENGTHS": vector([len(codes)], np.int32),
    }


def test_context_codes_are_passed_on_with_every_sentence(server: TritonServer) -> None:
    earlier = joined(stream(server, "csm_stream", speech_inputs(TEXT=prompt("An earlier turn."))), "AUDIO_CODES")
    spoken = stream(server, MODEL, speech_inputs(PROMPT=prompt("Hello there. How are you?"), **codes_context(earlier)))
    assert spoken.error is None
    for index, (sentence, outputs, _) in enumerate(spoken.sentences()):
        arrays = speech_inputs(TEXT=prompt(sentence), SEED=scalar(SEED + index, np.int64), **codes_context(earlier))
        assert np.array_equal(outputs["AUDIO_CODES"], joined(stream(server, "csm_stream", arrays), "AUDIO_CODES")), sentence
    bad = stream(server, MODEL, speech_inputs(PROMPT=prompt("Hello there."), **codes_context(np.full((1, 32), 2051))))
    assert bad.responses == [] and bad.error.message() == "CONTEXT_CODES: segment 0 codes must be in [0, 2050], got 2051"


def test_each_sentences_first_chunk_says_how_many_context_turns_it_dropped(server: TritonServer) -> None:
    """CONTEXT_OVERFLOW drop_oldest goes to csm_stream with every sentence; each one's CONTEXT_DROPPED is sent on."""
    context = context_arrays(CONVERSATION) | {"CONTEXT_OVERFLOW": prompt("drop_oldest"), "CONTEXT_PINNED": scalar(1, np.int32)}
    arrays = speech_inputs(PROMPT=prompt("Hello there. How are you?"), **context)
    spoken = stream(server, MODEL, arrays, outputs=("AUDIO", "TEXT", "CONTEXT_DROPPED"))
    assert spoken.error is None
    captions = [arrays["TEXT"][0, 0] for arrays in spoken.responses]
    assert len(set(captions)) == 2
    firsts = [index == 0 or caption != captions[index - 1] for index, caption in enumerate(captions)]
    dropped = [arrays["CONTEXT_DROPPED"].tolist() if "CONTEXT_DROPPED" in arrays else None for arrays in spoken.responses]
    assert dropped == [[[2]] if first else None for first in firsts]


def test_only_the_asked_outputs_are_sent(server: TritonServer) -> None:
    spoken = stream(server, MODEL, speech_inputs(PROMPT=prompt("Just audio.")), outputs=("AUDIO",))
    assert spoken.error is None and spoken.responses
    assert all(set(arrays) == {"AUDIO"} and arrays["AUDIO"].size for arrays in spoken.responses)
    codes_only = stream(server, MODEL, speech_inputs(PROMPT=prompt("Just codes.")), outputs=("AUDIO_CODES",))
    assert codes_only.error is None and codes_only.responses
    assert all(set(arrays) == {"AUDIO_CODES"} and arrays["AUDIO_CODES"].shape[2] == 32 for arrays in codes_only.responses)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            speech_inputs(PROMPT=prompt("Hello there. How are you?"), SPEAKER=scalar(-1, np.int32)),
            "SPEAKER: must be in [0, 2147483647], got -1",
        ),
        (speech_inputs(PROMPT=prompt("Hello there."), TOPK=scalar(0, np.int32)), "TOPK: must be in [1, 2051], got 0"),
        (speech_inputs(PROMPT=prompt(" \n")), "PROMPT: must not be empty"),
    ],
    ids=["SPEAKER", "TOPK", "PROMPT"],
)
def test_an_invalid_input_is_invalid_arg_naming_it(server: TritonServer, inputs: dict[str, np.ndarray], message: str) -> None:
    spoken = stream(server, MODEL, inputs)
    assert spoken.responses == []
    assert spoken.error is not None and spoken.error.message() == message
    assert spoken.error.status() == "StatusCode.INVALID_ARGUMENT"


def test_an_llm_failing_at_once_is_reported(server: TritonServer) -> None:
    spoken = stream(server, MODEL, speech_inputs(PROMPT=prompt("FAIL at once.")))
    assert spoken.error is not None and spoken.error.message() == "text_model 'fake_llm': fake_llm failed after 0 words, as asked"
    assert spoken.error.status() == "StatusCode.INTERNAL"


def test_an_llm_failing_mid_stream_ends_the_request_and_the_server_goes_on(server: TritonServer) -> None:
    spoken = stream(server, MODEL, speech_inputs(PROMPT=prompt("One sentence first. Then FAIL here.")))
    assert [caption for caption, _, _ in spoken.sentences()] == ["One sentence first."]
    # Python backend 24.10 loses a decoupled model's error sent after its first response: the
    # request then ends once the LLM has been silent for stream_timeout_s. Later backends pass the
    # LLM's own error on.
    assert spoken.error is not None
    assert re.fullmatch(r"text_model 'fake_llm': (fake_llm failed after 4 words, as asked|sent nothing for \d+ s)", spoken.error.message())
    failed_s = 5 * WORD_DELAY_MS / 1000
    assert spoken.end < failed_s + STREAM_TIMEOUT_S + 5
    after = stream(server, MODEL, speech_inputs(PROMPT=prompt("Still here.")))
    assert after.error is None and [caption for caption, _, _ in after.sentences()] == ["Still here."]


SENTENCES_SPOKEN = series("csm_time_to_first_audio_seconds_count")  # csm_stream's requests that made audio
CANCELLED = series("csm_rejected_requests_total", reason="cancelled", field="")


def test_a_cancelled_request_starts_no_more_sentences(server: TritonServer) -> None:
    sentences = [f"Sentence number {index}." for index in range(12)]
    before = settled(server)
    spoken = stream(server, MODEL, speech_inputs(PROMPT=prompt(" ".join(sentences))), cancel_after=1)
    assert spoken.error is None and len(spoken.responses) == 1
    # Long enough for the LLM to finish and for several more sentences to be spoken, had the
    # cancellation gone unnoticed.
    time.sleep(len(" ".join(sentences).split()) * WORD_DELAY_MS / 1000 + 3)
    assert scrape(server)[SENTENCES_SPOKEN] - before[SENTENCES_SPOKEN] <= 2
    after = stream(server, MODEL, speech_inputs(PROMPT=prompt("Still here.")))
    assert after.error is None and len(after.sentences()) == 1


def test_a_cancelled_request_stops_the_sentence_being_spoken_in_csm_stream(server: TritonServer) -> None:
    before = settled(server)
    inputs = speech_inputs(PROMPT=prompt("One long sentence, spoken slowly."), MAX_AUDIO_LENGTH_MS=scalar(30_000, np.int32))
    spoken = stream(server, MODEL, inputs, cancel_after=1)
    cancelled_at = time.monotonic()
    assert spoken.error is None and len(spoken.responses) == 1
    # 30 s of audio take the tiny model well over 10 s here: only the cancellation passed on ends it sooner.
    wait_for_idle_server(server, timeout_s=10)
    assert time.monotonic() - cancelled_at < 10
    # The stream's end and its count reach the metrics on the reporter's next passes, which a loaded
    # machine may delay: wait for them, then for nothing more to change.
    deadline = time.monotonic() + 15
    while scrape(server).get(CANCELLED, 0) == before.get(CANCELLED, 0):
        assert time.monotonic() < deadline, "the cancelled sentence was never counted as cancelled in csm_stream"
        time.sleep(0.2)
    assert settled(server)[CANCELLED] - before.get(CANCELLED, 0) == 1


def test_a_killed_csm_stream_ends_the_answer_being_spoken_within_seconds(server: TritonServer) -> None:
    """csm_stream's stub killed while a sentence is spoken (its first chunk has come): the request
    ends with UNAVAILABLE at the call's first probe (the sentence's stream would never end), long
    before stream_timeout_s."""
    inputs = speech_inputs(PROMPT=prompt("One long sentence, spoken slowly."), MAX_AUDIO_LENGTH_MS=scalar(30_000, np.int32))
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((time.monotonic(), result, error)), headers=STATUS_HEADERS)
    try:
        client.async_stream_infer(MODEL, tensors(grpcclient, inputs), enable_empty_final_response=True)
        _, first, error = events.get(timeout=60)
        assert error is None and first.as_numpy("AUDIO").size, error
        [stub] = [process for process in stubs(server, "csm_stream") if process.status() != psutil.STATUS_ZOMBIE]
        stub.kill()
        killed = time.monotonic()
        while error is None:
            ended, _, error = events.get(timeout=15)
    finally:
        client.stop_stream()
        client.close()
    assert ended - killed < min(15, STREAM_TIMEOUT_S), f"ended {ended - killed:.1f} s after the kill"
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "csm_stream's process died and this request was lost" in error.message()
    while True:  # the csm front's watch reloads csm_stream
        after = stream(server, MODEL, speech_inputs(PROMPT=prompt("Back again.")))
        if after.error is None:
            break
        assert time.monotonic() - killed < 60, f"text_stream_tts did not speak again: {after.error}"
        time.sleep(1)
