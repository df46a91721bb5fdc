"""Prefix reuse (engine/prefix_pool.py): a conversation's next turn copies its history's keys and
values from the pool instead of prefilling them, and generates exactly the codes it would
without the pool (greedy and sampled, text and audio context, the dynamic path and the frame
step, alone and batched, tiny and full size); the pool never holds more than its bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import run

from csm_triton import Generator, Segment
from csm_triton.engine.engine import Engine
from csm_triton.engine.prefix_pool import BLOCK_POSITIONS, PrefixPool, block_bytes
from csm_triton.engine.stream import Stream
from csm_triton.model import checkpoint
from csm_triton.model.config import CSM_1B, MIB
from csm_triton.model.model import CSM

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> CSM:
    """The tiny model's own copy: engines here size its caches (the conftest Generator's stay as they are)."""
    return checkpoint.load_model(checkpoint.resolve(tiny_model_dir), torch.device("cpu"), torch.float32, "none")


TURNS = [
    (1, "I am fine, thanks. And you, how have you been?"),
    (0, "Very well. Shall we talk about the weather?"),
    (1, "Yes, it has been raining all week here."),
]


def stream(generator: Generator, text: str, speaker: int, context: list[Segment], frames: int, topk: int, seed: int) -> Stream:
    tokens, mask = generator.prompt(text, speaker, context)
    return Stream(tokens, mask, frames, 0.9, topk, seed)


def only(codes: dict[int, torch.Tensor]) -> torch.Tensor:
    """The codes of the one request `run` ran."""
    (single,) = codes.values()
    return single


def first_segment(kind: str) -> Segment:
    """A conversation's opening turn: text alone, or text with (Mimi-encoded) audio."""
    if kind == "text":
        return Segment(speaker=0, text="Hello there, how are you today, my friend?")
    audio = np.random.default_rng(0).standard_normal(24_000).astype(np.float32) * 0.1
    return Segment(speaker=0, text="Hello there.", audio=audio, sample_rate=24_000)


def converse(generator: Generator, engine: Engine, plain: Engine, kind: str, topk: int, room: bool = True, frames: int = 12) -> None:
    """Speak TURNS one after another, each conditioned on the turns before it (replies as codes),
    on `engine` (with a pool) and on `plain` (without): the same codes turn by turn. With `room`
    in the pool, each turn reuses its whole history, up to its last whole block."""
    context, cached, reused = [first_segment(kind)], 0, []
    for turn, (speaker, text) in enumerate(TURNS):
        ask = stream(generator, text, speaker, context, frames, topk, seed=turn)
        before = engine.prefix_pool.stats()["positions_reused"]
        codes = only(run(engine, {0: [ask]}))
        reused.append(engine.prefix_pool.stats()["positions_reused"] - before)
        assert torch.equal(codes, only(run(plain, {0: [stream(generator, text, speaker, context, frames, topk, seed=turn)]})))
        # The history the pool holds: the last prompt and the frames fed back (all but the last, or every one before an end of audio).
        assert reused[-1] == min(cached // BLOCK_POSITIONS * BLOCK_POSITIONS, len(ask.tokens) - 1) or not room
        cached = len(ask.tokens) + len(codes) - (len(codes) == frames)
        context.append(Segment(speaker=speaker, text=text, codes=codes.numpy().astype(np.int32)))
    assert all(positions >= BLOCK_POSITIONS for positions in reused[1:])


@pytest.mark.parametrize("frame_graphs", [False, True], ids=["dynamic", "frame-step"])
@pytest.mark.parametrize("topk", [1, 50], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", ["text", "audio"])
def test_reuse_generates_the_codes_of_a_whole_prefill(generator: Generator, model: CSM, frame_graphs: bool, topk: int, kind: str) -> None:
    engine = Engine(model, 2, frame_graphs=frame_graphs, prefix_pool_bytes=8 * MIB)
    converse(generator, engine, Engine(model, 2, frame_graphs=frame_graphs), kind, topk)


def test_reused_keys_and_values_are_a_prefills(generator: Generator, model: CSM) -> None:
    """The keys and values copied into a slot are those a prefill of the whole prompt computes,
    up to float rounding (kernels of other shapes sum in another order)."""
    engine, plain = Engine(model, 1, prefix_pool_bytes=8 * MIB), Engine(model, 1)
    context = [first_segment("text")]
    reply = run(engine, {0: [stream(generator, *TURNS[0][::-1], context, 10, 1, 0)]})[0]
    context.append(Segment(speaker=1, text=TURNS[0][1], codes=reply.numpy().astype(np.int32)))
    tokens, mask = generator.prompt(TURNS[1][1], 0, context)
    engine.start(Stream(tokens, mask, 1, 0.9, 1, 0))
    reused = engine._slots[0].position
    assert reused >= 2 * BLOCK_POSITIONS
    cached = [torch.stack([layer.attn.kv_cache.k[0, :, :reused], layer.attn.kv_cache.v[0, :, :reused]]) for layer in model.backbone.layers]
    engine.abort()
    plain.start(Stream(tokens, mask, 1, 0.9, 1, 0))
    plain.step()
    for layer, keys_values in zip(model.backbone.layers, cached, strict=True):
        prefilled = torch.stack([layer.attn.kv_cache.k[0, :, :reused], layer.attn.kv_cache.v[0, :, :reused]])
        torch.testing.assert_close(keys_values, prefilled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("frame_graphs", [False, True], ids=["dynamic", "frame-step"])
def test_batched_turns_equal_alone(generator: Generator, model: CSM, frame_graphs: bool) -> None:
    """Two conversations' next turns, both found in the pool, in one batch: each gets the codes
    it gets alone without a pool."""
    engine, plain = Engine(model, 4, frame_graphs=frame_graphs, prefix_pool_bytes=8 * MIB), Engine(model, 4, frame_graphs=frame_graphs)
    openings = [first_segment("text"), Segment(speaker=1, text="A different conversation starts here, with other words.")]
    firsts = [stream(generator, "Tell me more.", 0, [opening], 9, 50, seed) for seed, opening in enumerate(openings)]
    replies = run(engine, {0: firsts})
    seconds = {}
    for index, opening in enumerate(openings):
        context = [opening, Segment(speaker=0, text="Tell me more.", codes=replies[index].numpy().astype(np.int32))]
        seconds[index] = context
    together = run(engine, {0: [stream(generator, "And then?", 1, seconds[i], 9, 50, 7 + i) for i in seconds]})
    assert engine.prefix_pool.stats()["hits"] == 2
    for index, context in seconds.items():
        alone = run(plain, {0: [stream(generator, "And then?", 1, context, 9, 50, 7 + index)]})
        assert torch.equal(together[2 + index], only(alone))


def test_concurrent_requests_sharing_a_prefix(generator: Generator, model: CSM) -> None:
    """Requests with one context arriving together (none finds it yet) and one while they run
    (it finds their prompt): all three get their codes without a pool."""
    engine, plain = Engine(model, 3, prefix_pool_bytes=8 * MIB), Engine(model, 3)
    context = [first_segment("text"), Segment(speaker=1, text="A long shared context turn, " * 3)]
    asks = [("One.", 1), ("Two, a little longer.", 2), ("Three comes later.", 3)]
    shared = run(
        engine,
        {
            0: [stream(generator, text, 0, context, 8, 50, seed) for text, seed in asks[:2]],
            2: [stream(generator, asks[2][0], 0, context, 8, 50, asks[2][1])],
        },
    )
    stats = engine.prefix_pool.stats()
    assert stats["misses"] == 2 and stats["hits"] == 1
    for request_id, (text, seed) in enumerate(asks):
        alone = run(plain, {0: [stream(generator, text, 0, context, 8, 50, seed)]})
        assert torch.equal(shared[request_id], only(alone))


def test_pool_never_holds_more_than_its_bytes(generator: Generator, model: CSM) -> None:
    """A pool of three and a half blocks holds three: the first blocks of a conversation's prefix;
    a second conversation evicts them, the least recently used, and both get the codes of a whole
    prefill."""
    bound = int(3.5 * block_bytes(model.config, torch.float32))
    engine = Engine(model, 1, prefix_pool_bytes=bound)
    assert engine.prefix_pool.blocks.numel() * engine.prefix_pool.blocks.element_size() <= bound
    plain = Engine(model, 1)
    for kind in ("text", "audio"):  # the second conversation's blocks evict the first's
        converse(generator, engine, plain, kind, 50, room=False)
    stats = engine.prefix_pool.stats()
    assert stats["bytes"] <= stats["max_bytes"] <= bound
    assert stats["blocks"] == 3 and stats["blocks_evicted"] > 0


def test_least_recently_used_blocks_leave_first(model: CSM) -> None:
    """Of two prefixes, the one used last stays; within a prefix, its deepest blocks leave first."""
    Engine(model, 1)  # caches for one slot
    pool = PrefixPool(model, 4 * block_bytes(model.config, torch.float32))
    chains = [[bytes([chain, block]) for block in range(3)] for chain in range(2)]
    pool.store(0, chains[0], 3 * BLOCK_POSITIONS)
    pool.store(0, chains[1][:2], 2 * BLOCK_POSITIONS)  # evicts chain 0's deepest block
    assert pool.reuse(0, chains[0], 10**6) == 2 * BLOCK_POSITIONS
    pool.store(0, chains[1], 3 * BLOCK_POSITIONS)  # chain 1 refreshed first: chain 0's deepest block left goes
    assert pool.reuse(0, chains[1], 10**6) == 3 * BLOCK_POSITIONS
    assert pool.reuse(0, chains[0], 10**6) == BLOCK_POSITIONS


def test_full_size_reuse_generates_the_same_codes(generator: Generator) -> None:
    """The real 1B + 100M architecture (random weights, fp32): a second turn found in the pool
    gets the greedy codes of a whole prefill."""
    from export.tiny import random_model

    model = random_model(CSM_1B, torch.device("cpu"), torch.float32)
    engine, plain = Engine(model, 1, prefix_pool_bytes=64 * MIB), Engine(model, 1)
    context = [first_segment("text")]
    reply = run(engine, {0: [stream(generator, TURNS[0][1], 1, context, 4, 1, 0)]})[0]
    context.append(Segment(speaker=1, text=TURNS[0][1], codes=reply.numpy().astype(np.int32)))
    second = stream(generator, TURNS[1][1], 0, context, 4, 1, 1)
    codes = run(engine, {0: [second]})[1]
    assert engine.prefix_pool.stats()["positions_reused"] >= 2 * BLOCK_POSITIONS
    assert torch.equal(codes, run(plain, {0: [stream(generator, TURNS[1][1], 0, context, 4, 1, 1)]})[0])


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [1, 50], ids=["greedy", "sampled"])
def test_cuda_reuse_with_captured_frame_steps(generator: Generator, tiny_model_dir: Path, topk: int) -> None:
    """On CUDA, the pool in device memory and the frame step captured as CUDA graphs: a
    conversation gets the codes it gets without the pool (fp32 without TF32, for exact codes)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = checkpoint.load_model(checkpoint.resolve(tiny_model_dir), torch.device("cuda"), torch.float32, "none")
    engine = Engine(model, 2, prefix_pool_bytes=8 * MIB, compile=False)
    assert engine.graphs is not None and engine.graphs.capture and engine.prefix_pool.blocks.is_cuda
    converse(generator, engine, Engine(model, 2, compile=False), "text", topk)
