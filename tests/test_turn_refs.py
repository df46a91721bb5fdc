"""Turn references for Triton's own callers: csm_stream signs a completed stream's turn (TURN) with
its turn_key, and a later request's context names that turn by it (CONTEXT_TURN, cut by
CONTEXT_PLAYED_MS) in place of its codes. Against a real tritonserver on the tiny model, whose
turn_key is conftest.TURN_KEY; the reading of the tensors, refusals and a server without a key are
test_request.py's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import TURN_KEY
from csm_client import AsyncCSMClient, CSMClient, CSMError, Segment, TurnChunk, TurnRef, build_inputs, open_turn, sign_turn
from csm_client.segment import context_arrays

PARAMS = {"max_audio_length_ms": 480, "seed": 11}  # 6 frames
CHUNKING = {"first_chunk_frames": 2, "chunk_frames": 3}
KEY = TURN_KEY.encode()
TEXT, SPEAKER = "An earlier turn.", 1


def first_turn(client: CSMClient) -> tuple[str, np.ndarray]:
    """The reference and codes of a streamed turn, asked for with its reference."""
    chunks = list(client.stream_turn(TEXT, SPEAKER, **CHUNKING, **PARAMS, with_reference=True))
    assert [chunk.turn is not None for chunk in chunks] == [False] * (len(chunks) - 1) + [True]  # on the last chunk only
    return chunks[-1].turn, np.concatenate([chunk.codes for chunk in chunks])


@pytest.mark.server
def test_a_streams_turn_opens_to_its_text_speaker_and_the_codes_streamed(triton_server) -> None:
    with CSMClient(triton_server.grpc_url) as client:
        reference, codes = first_turn(client)
        assert all(chunk.turn is None for chunk in client.stream_turn(TEXT, SPEAKER, **PARAMS))  # only when asked for
    record = open_turn(KEY, reference)
    assert (record.text, record.speaker) == (TEXT, SPEAKER) and len(codes) == 6
    np.testing.assert_array_equal(record.codes, codes)
    # The unary csm model passes it on from csm_stream.
    triton = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        outputs = [grpcclient.InferRequestedOutput(name) for name in ("AUDIO_CODES", "TURN")]
        result = triton.infer("csm", build_inputs(grpcclient, TEXT, SPEAKER, **PARAMS), outputs=outputs)
    finally:
        triton.close()
    np.testing.assert_array_equal(open_turn(KEY, result.as_numpy("TURN")[0, 0].decode()).codes, result.as_numpy("AUDIO_CODES")[0])


@pytest.mark.server
def test_a_turn_by_reference_is_the_turn_sent_as_its_codes_cut_where_it_was_played(triton_server) -> None:
    with CSMClient(triton_server.grpc_url) as client:
        reference, codes = first_turn(client)

        def reply(turn: object) -> list[list[list[int]]]:
            return client.generate_codes("A reply.", 0, [Segment(0, "Before it."), turn], **PARAMS).tolist()

        assert reply(TurnRef(reference)) == reply(Segment(SPEAKER, TEXT, codes=codes))
        assert reply(TurnRef(reference, played_ms=319)) == reply(Segment(SPEAKER, TEXT, codes=codes[: 319 // 80]))
        assert reply(TurnRef(reference, played_ms=79)) == reply(Segment(SPEAKER, TEXT))  # no frame heard: its text alone
        streamed = client.stream_turn("A reply.", 0, [Segment(0, "Before it."), TurnRef(reference)], **CHUNKING, **PARAMS)
        assert np.concatenate([chunk.codes for chunk in streamed]).tolist() == reply(TurnRef(reference))


@pytest.mark.server
def test_bad_references_are_invalid_arg_naming_context_turn_while_a_good_request_completes(triton_server) -> None:
    reference = sign_turn(KEY, TEXT, SPEAKER, np.ones((4, 32), np.int32))
    bad = {
        "forged": sign_turn(b"not the server's key, but 32 long", TEXT, SPEAKER, np.ones((4, 32), np.int32)),
        "altered": reference[:20] + ("A" if reference[20] != "A" else "B") + reference[21:],
        "cut short": reference[:-5],
        "garbage": "csm1.garbage",
    }

    async def both() -> tuple[list[TurnChunk], list[BaseException | np.ndarray]]:
        """A good stream, and the bad requests sent while it runs."""
        async with AsyncCSMClient(triton_server.grpc_url) as client:
            chunks = client.stream_turn("Fine.", 0, [TurnRef(reference)], **PARAMS, with_reference=True)
            good = asyncio.ensure_future(collect(chunks))
            calls = [client.generate_codes("Refused.", 0, [Segment(0, "Hi."), TurnRef(ref)], **PARAMS) for ref in bad.values()]
            answers = await asyncio.gather(*calls, return_exceptions=True)
            return await good, answers

    good, answers = asyncio.run(both())
    for name, answer in zip(bad, answers, strict=True):
        assert isinstance(answer, CSMError) and answer.message.startswith("CONTEXT_TURN: segment 1: "), (name, answer)
        assert "INVALID_ARG" in str(answer.status), (name, answer.status)
    assert sum(len(chunk.codes) for chunk in good) == 6 and open_turn(KEY, good[-1].turn).text == "Fine."


async def collect(chunks: AsyncIterator[TurnChunk]) -> list[TurnChunk]:
    return [chunk async for chunk in chunks]


@pytest.mark.unit
def test_turn_refs_are_packed_into_context_turn_and_context_played_ms() -> None:
    arrays = context_arrays([Segment(0, "Hi."), TurnRef("csm1.a.b", played_ms=160), TurnRef("csm1.c.d")])
    assert arrays["CONTEXT_TEXT"].tolist() == [[b"Hi.", b"", b""]]
    assert arrays["CONTEXT_TURN"].tolist() == [[b"", b"csm1.a.b", b"csm1.c.d"]]
    assert arrays["CONTEXT_PLAYED_MS"].tolist() == [[-1, 160, -1]]
    assert "CONTEXT_TURN" not in context_arrays([Segment(0, "Hi.")])  # a server without a turn key takes it
    with pytest.raises(ValueError, match="^turn played_ms: must be in"):
        TurnRef("csm1.a.b", played_ms=-1)
    with pytest.raises(ValueError, match="^turn ref: must be a turn reference string"):
        TurnRef(b"csm1.a.b")
