"""A context that never overflows by surprise: context_overflow "drop_oldest" leaves out the oldest
context segments, never the pinned ones (a voice's clip, the first `context_pinned`), until the
prompt fits, and says how many (Stream.context_dropped; CONTEXT_DROPPED over Triton, on a stream's
first response; TurnChunk.context_dropped in the client). In process and against a real
tritonserver, on the tiny model; the turns are codes, so that nothing is Mimi-encoded."""

from __future__ import annotations

import asyncio
import importlib

import numpy as np
import pytest

from csm_client import AsyncCSMClient, CSMClient, CSMError, Segment, TurnChunk, build_inputs
from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton import GenerationRequest, Generator

PARAMS = {"max_audio_length_ms": 800, "seed": 5}  # 10 frames: a prompt of at most 2037 positions fits
DROP = {"context_overflow": "drop_oldest", "context_pinned": 1}
CHUNKING = {"first_chunk_frames": 2, "chunk_frames": 3}


def turn(index: int, frames: int) -> Segment:
    """A turn given as its codes, each turn's of its own value; its text takes 9 positions."""
    return Segment(index % 2, f"Turn {index}.", codes=np.full((frames, 32), index + 1, dtype=np.int32))


# A clip of 20 positions, then six turns of 410: 2487 positions with the reply's 7, of which the
# codes alone take 2417, more than the 2046 any prompt holds. Leaving out turns 1 and 2 fits (1667).
CONVERSATION = [turn(0, 10), *(turn(index, 400) for index in range(1, 7))]
KEPT = [CONVERSATION[0], *CONVERSATION[3:]]


def built(generator: Generator, request: GenerationRequest) -> tuple[np.ndarray, int]:
    """The prompt tokens the request's stream is given, and how many context segments it left out."""
    generator.limits.check(request)
    stream = generator.stream(request)
    return stream.tokens.numpy(), stream.context_dropped


@pytest.mark.engine
def test_the_oldest_unpinned_turns_are_dropped_until_the_prompt_fits(generator: Generator) -> None:
    tokens, dropped = built(generator, GenerationRequest("Reply.", 0, CONVERSATION, **PARAMS, **DROP))
    assert dropped == 2
    np.testing.assert_array_equal(tokens, generator.prompt("Reply.", 0, KEPT)[0].numpy())
    # A conversation that fits loses nothing, under drop_oldest as under refuse.
    assert built(generator, GenerationRequest("Reply.", 0, KEPT, **PARAMS, **DROP))[1] == 0
    answered = generator.generate_codes("Reply.", 0, CONVERSATION, **PARAMS, **DROP)
    assert answered.tolist() == generator.generate_codes("Reply.", 0, KEPT, **PARAMS).tolist()


@pytest.mark.engine
def test_a_voices_clip_is_always_pinned_and_never_counted(generator: Generator) -> None:
    generator.voices["narrator"] = CONVERSATION[0]
    try:
        own = CONVERSATION[1:]
        tokens, dropped = built(generator, GenerationRequest("Reply.", 0, own, **PARAMS, voice="narrator", context_overflow="drop_oldest"))
        assert dropped == 2
        np.testing.assert_array_equal(tokens, generator.prompt("Reply.", 0, KEPT)[0].numpy())
        tokens, dropped = built(generator, GenerationRequest("Reply.", 0, own, **PARAMS, voice="narrator", **DROP))  # and turn 1
        assert dropped == 2
        np.testing.assert_array_equal(tokens, generator.prompt("Reply.", 0, [*CONVERSATION[:2], *CONVERSATION[4:]])[0].numpy())
    finally:
        del generator.voices["narrator"]


@pytest.mark.engine
def test_refuse_refuses_and_drop_oldest_refuses_what_cannot_fit(generator: Generator) -> None:
    with pytest.raises(ValueError, match=r"^context\[6\].codes: holds 400 frames, which bring the context audio to 2417 prompt positions"):
        generator.generate_codes("Reply.", 0, CONVERSATION, **PARAMS)
    with pytest.raises(ValueError, match="^prompt: 2077 positions of context and text plus up to 10 frames exceed the model's 2048"):
        generator.generate_codes("Reply.", 0, CONVERSATION[:6], **PARAMS)
    with pytest.raises(
        ValueError,
        match=r"^prompt: 2077 positions of pinned context and text plus up to 10 frames exceed the model's 2048-position limit "
        r"even with all unpinned context segments \(1\) dropped \(context_overflow 'drop_oldest'\)",
    ):
        generator.generate_codes("Reply.", 0, CONVERSATION, **PARAMS, context_overflow="drop_oldest", context_pinned=6)
    assert generator.stats().streams == 0


@pytest.mark.engine
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"context_overflow": "newest"}, "context_overflow: must be 'refuse' or 'drop_oldest', got 'newest'"),
        ({"context_overflow": None}, "context_overflow: must be a string, got NoneType"),
        ({"context_pinned": 3}, r"context_pinned: must be in \[0, 2\], at most the number of context segments \(2\), got 3"),
        ({"context_pinned": -1}, r"context_pinned: must be in \[0, 2\], at most the number of context segments \(2\), got -1"),
        ({"context_pinned": 1.0}, "context_pinned: must be an integer, got 1.0"),
    ],
)
def test_bad_options_name_the_field(generator: Generator, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        generator.generate_codes("Reply.", 0, CONVERSATION[:2], **PARAMS, **options)


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_csm_answers_with_the_turns_it_dropped_when_asked(triton_server, generator: Generator, protocol: str) -> None:
    module = importlib.import_module(f"tritonclient.{protocol}")
    triton = module.InferenceServerClient(url(triton_server, protocol))
    try:

        def infer(context: list[Segment], outputs: tuple[str, ...], **options) -> object:
            inputs = build_inputs(module, "Reply.", 0, context, **PARAMS, **options)
            return triton.infer("csm", inputs, outputs=[module.InferRequestedOutput(name) for name in outputs])

        result = infer(CONVERSATION, ("AUDIO_CODES", "CONTEXT_DROPPED"), **DROP)
        assert result.as_numpy("CONTEXT_DROPPED").tolist() == [[2]]
        np.testing.assert_array_equal(result.as_numpy("AUDIO_CODES")[0], generator.generate_codes("Reply.", 0, KEPT, **PARAMS).numpy())
        assert infer(KEPT, ("AUDIO_CODES", "CONTEXT_DROPPED")).as_numpy("CONTEXT_DROPPED").tolist() == [[0]]
        assert infer(KEPT, ("AUDIO_CODES",)).as_numpy("CONTEXT_DROPPED") is None  # only when asked for
    finally:
        triton.close()


@pytest.mark.server
def test_stream_turn_yields_the_codes_and_audio_of_generate_codes_and_stream(triton_server, generator: Generator) -> None:
    with CSMClient(triton_server.grpc_url) as client:
        chunks = list(client.stream_turn("Reply.", 0, CONVERSATION, **CHUNKING, **PARAMS, **DROP))
        audio = np.concatenate(list(client.stream("Reply.", 0, CONVERSATION, **CHUNKING, **PARAMS, **DROP)))
    assert all(isinstance(chunk, TurnChunk) and chunk.codes.dtype == np.int32 for chunk in chunks)
    assert [chunk.context_dropped for chunk in chunks] == [2] + [None] * (len(chunks) - 1)
    assert [len(chunk.audio) for chunk in chunks] == [len(chunk.codes) * SAMPLES_PER_FRAME for chunk in chunks]
    codes = np.concatenate([chunk.codes for chunk in chunks])
    np.testing.assert_array_equal(codes, generator.generate_codes("Reply.", 0, CONVERSATION, **PARAMS, **DROP).numpy())
    np.testing.assert_allclose(np.concatenate([chunk.audio for chunk in chunks]), audio, atol=1e-4, rtol=0)

    async def async_turn() -> list[TurnChunk]:
        async with AsyncCSMClient(triton_server.grpc_url) as client:
            return [chunk async for chunk in client.stream_turn("Reply.", 0, KEPT, **CHUNKING, **PARAMS)]

    async_chunks = asyncio.run(async_turn())
    assert [chunk.context_dropped for chunk in async_chunks][:2] == [0, None]
    np.testing.assert_array_equal(np.concatenate([chunk.codes for chunk in async_chunks]), codes)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_overflow_inputs_are_invalid_arg_naming_the_input(triton_server, protocol: str) -> None:
    with CSMClient(url(triton_server, protocol), protocol) as client:
        refusals = {
            "^CONTEXT_OVERFLOW: must be 'refuse' or 'drop_oldest', got 'newest'": {"context_overflow": "newest"},
            r"^CONTEXT_PINNED: must be in \[0, 2\], at most the number of context segments \(2\), got 3": {"context_pinned": 3},
        }
        for message, options in refusals.items():
            with pytest.raises(CSMError, match=message) as caught:
                client.generate_codes("Reply.", 0, CONVERSATION[:2], **PARAMS, **options)
            assert "INVALID_ARG" in str(caught.value.status) or "400" in str(caught.value.status)
            if protocol == "grpc":
                with pytest.raises(CSMError, match=message):
                    next(client.stream_turn("Reply.", 0, CONVERSATION[:2], **PARAMS, **options))
        with pytest.raises(CSMError, match=r"^prompt: .* even with all unpinned context segments \(1\) dropped"):
            client.generate_codes("Reply.", 0, CONVERSATION, **PARAMS, context_overflow="drop_oldest", context_pinned=6)
        with pytest.raises(CSMError, match=r"^CONTEXT_CODES_LENGTHS: 2410 frames of context codes take 2417 prompt positions"):
            client.generate_codes("Reply.", 0, CONVERSATION, **PARAMS)  # refuse: the codes alone overflow
        assert len(client.generate_codes("Reply.", 0, CONVERSATION[:2], **PARAMS)) == 10  # the others are served as before
