"""The channel between csm_stream's stub and its engine process: messages arrive whole and equal,
and their numpy arrays (a chunk's audio, a request's context clip) travel out of band, outside the
pickle, so that neither side copies them into or out of its bytes. No model is loaded."""

from __future__ import annotations

import threading
from multiprocessing import Pipe

import numpy as np
import pytest
import torch

from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton.engine.pacing import ADAPTIVE
from csm_triton.request import GenerationRequest, Segment
from csm_triton.triton.protocol import Channel, ChunkOut, Generate, Refused, Status

pytestmark = pytest.mark.unit

FRAMES = 12  # the adaptive schedule's largest chunk


@pytest.fixture
def channels():
    ours, theirs = Pipe()
    yield Channel(ours), Channel(theirs)
    ours.close()
    theirs.close()


def test_a_chunk_arrives_equal_with_its_audio_outside_the_pickle(channels) -> None:
    sender, receiver = channels
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(FRAMES * SAMPLES_PER_FRAME).astype(np.float32)
    codes = rng.integers(0, 2048, (FRAMES, 32), dtype=np.int32)
    sender.send(ChunkOut(7, codes, audio, "eos"))
    pickle_bytes = receiver.connection.recv_bytes()  # the message's frame: the pickle alone
    buffers = [receiver.connection.recv_bytes() for _ in range(int.from_bytes(pickle_bytes[:4], "little"))]
    assert len(pickle_bytes) < 1024 < audio.nbytes  # neither array is in it
    assert sorted(len(buffer) for buffer in buffers) == sorted([codes.nbytes, audio.nbytes])

    sender.send(ChunkOut(8, codes, audio, None))
    received = receiver.recv()
    assert received.key == 8 and received.finish is None
    assert np.array_equal(received.audio, audio) and received.audio.dtype == np.float32
    assert np.array_equal(received.codes, codes) and received.codes.dtype == np.int32


def test_a_request_with_a_clip_arrives_equal_and_the_clip_reads_as_a_tensor(channels) -> None:
    """A received array is a read-only view of the bytes it arrived in; the prompt builder copies
    it into a tensor (torch would warn on a read-only array), and the arrays compare equal."""
    sender, receiver = channels
    clip = np.sin(np.arange(16_000, dtype=np.float32) / 5)
    request = GenerationRequest("Hello.", 0, [Segment(1, "Hi.", clip, sample_rate=16_000), Segment(0, "Yes.")], seed=3)
    sender.send(Generate(1, request, True, ADAPTIVE, clips=((0, "key"),)))
    received = receiver.recv()
    assert received.clips == ((0, "key"),) and received.chunking == ADAPTIVE
    assert received.request.text == "Hello." and received.request.seed == 3
    arrived = received.request.context[0].audio
    assert np.array_equal(arrived, clip) and received.request.context[1].audio is None
    assert torch.equal(torch.tensor(arrived), torch.from_numpy(clip))


def test_messages_from_many_threads_arrive_whole(channels) -> None:
    """Each message's frames go out under one lock: threads sending at once never interleave them."""
    sender, receiver = channels
    audio = np.arange(4 * SAMPLES_PER_FRAME, dtype=np.float32)

    def send(first: int) -> None:
        for key in range(first, first + 50):
            sender.send(ChunkOut(key, np.full((4, 32), key, dtype=np.int32), audio + key))

    threads = [threading.Thread(target=send, args=(first,)) for first in (0, 1000, 2000)]
    for thread in threads:
        thread.start()
    received = [receiver.recv() for _ in range(150)]
    for thread in threads:
        thread.join()
    assert sorted(message.key for message in received) == [*range(50), *range(1000, 1050), *range(2000, 2050)]
    for message in received:
        assert (message.codes == message.key).all() and np.array_equal(message.audio, audio + message.key)
    sender.send(Refused(3, Status.BUSY, "busy"))
    assert receiver.recv() == Refused(3, Status.BUSY, "busy")
