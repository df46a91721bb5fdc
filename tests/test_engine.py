"""The batching engine: batched equals alone, slots join and leave, cancellation, limits."""

from __future__ import annotations

import dataclasses
import shutil
from collections import deque
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from csm_triton import GenerationRequest, Generator, Segment, load_csm_1b
from csm_triton.engine.engine import Engine, StepResult
from csm_triton.engine.stream import Stream
from csm_triton.model.checkpoint import read_state_dict
from csm_triton.model.quantize import CpuLinear, quantize
from triton_tensors import LONG_TEXTS

pytestmark = pytest.mark.engine


def admit(engine: Engine, waiting: deque[Stream]) -> list[int]:
    """Start the waiting requests that free slots take, oldest first, as the serving loop does."""
    return [engine.start(waiting.popleft()) for _ in range(min(len(waiting), engine.free_slots))]


def run(engine: Engine, arrivals: dict[int, list[Stream]]) -> dict[int, torch.Tensor]:
    """Submit requests at the given step numbers, step until all finish; codes per request id."""
    frames: dict[int, list[torch.Tensor]] = {}
    finished: set[int] = set()
    waiting: deque[Stream] = deque()
    step = 0
    while step <= max(arrivals) or waiting or engine.has_work:
        waiting.extend(arrivals.get(step, []))
        for request_id in admit(engine, waiting):
            frames[request_id] = []
        for result in engine.step():
            if result.codes is not None:
                frames[result.request_id].append(result.codes)
            if result.finish is not None:
                finished.add(result.request_id)
        step += 1
    assert finished == set(frames)
    return {rid: torch.stack(codes) for rid, codes in frames.items()}


def requests(generator: Generator, topk: int) -> list[Stream]:
    context = [Segment(speaker=1, text="How are you doing today?"), Segment(speaker=0, text="Fine, thanks.")]
    asks = [
        GenerationRequest("Hi.", 0, topk=topk, max_audio_length_ms=800, seed=11),
        GenerationRequest("A rather longer sentence, to give this prompt more positions.", 1, topk=topk, max_audio_length_ms=1200, seed=12),
        GenerationRequest("With some context before it.", 0, context, topk=topk, max_audio_length_ms=640, seed=13),
    ]
    return [generator.stream(ask) for ask in asks]


@pytest.mark.parametrize("arrival_steps", [(0, 2, 5), (0, 0, 0)], ids=["staggered", "prefilled-together"])
@pytest.mark.parametrize("topk", [1, 50], ids=["greedy", "sampled"])
def test_batched_equals_alone(generator: Generator, topk: int, arrival_steps: tuple[int, int, int]) -> None:
    batch = requests(generator, topk)
    assert len({len(r.tokens) for r in batch}) == 3
    alone = [next(iter(run(generator.engine, {0: [r]}).values())) for r in batch]
    arrivals: dict[int, list[Stream]] = {}
    for step, request in zip(arrival_steps, batch, strict=True):
        arrivals.setdefault(step, []).append(request)
    together = run(generator.engine, arrivals)
    for solo, joint in zip(alone, together.values(), strict=True):
        assert solo.shape == (solo.shape[0], 32) and len(solo) > 0
        assert torch.equal(solo, joint)


def test_more_requests_than_slots_queue_and_all_finish(generator: Generator) -> None:
    engine = generator.engine
    asks = [
        generator.stream(GenerationRequest(f"Number {i}.", i % 3, max_audio_length_ms=240 + 80 * i, seed=i))
        for i in range(engine.num_slots + 3)
    ]
    peak_before = engine.stats.peak_batch
    codes = run(engine, {0: asks})
    assert [len(c) for c in codes.values()] == [3 + i for i in range(len(asks))]
    assert engine.stats.peak_batch == max(peak_before, engine.num_slots)
    assert engine.active_slots == 0


def test_cancel_frees_the_slot_and_others_continue(generator: Generator) -> None:
    """A request waiting for a slot is the serving loop's to cancel (test_streaming's
    test_requests_beyond_the_slots_count_as_waiting): the engine holds only running ones."""
    engine = generator.engine
    keep, drop = (generator.stream(GenerationRequest(t, 0, max_audio_length_ms=800, seed=3)) for t in ("Keep me.", "Drop me."))
    keep_id, drop_id = engine.start(keep), engine.start(drop)
    for _ in range(engine.num_slots - 2):
        engine.start(keep)
    with pytest.raises(RuntimeError, match="slots is busy"):
        engine.start(keep)
    engine.step()
    assert engine.active_slots == engine.num_slots
    engine.cancel(drop_id)
    assert engine.free_slots == 1  # at once, for the next request
    results = engine.step()
    finishes = {r.request_id: r.finish for r in results}
    assert finishes[drop_id] == "cancelled"
    assert finishes[keep_id] is None
    assert engine.active_slots == engine.num_slots - 1
    frames = {keep_id: 2}
    while engine.has_work:
        for result in engine.step():
            assert result.request_id != drop_id
            if result.request_id == keep_id and result.codes is not None:
                frames[keep_id] += 1
    assert frames[keep_id] == 10
    assert engine.active_slots == 0


def test_prompt_over_the_position_limit_is_refused_before_taking_a_slot(generator: Generator) -> None:
    context = [Segment(speaker=1, text=text) for text in LONG_TEXTS[1:]]
    with pytest.raises(ValueError, match=r"prompt: \d+ positions .* exceed the model's 2048-position limit"):
        generator.stream(GenerationRequest(LONG_TEXTS[0], 0, context))
    assert generator.engine.active_slots == 0 and not generator.engine.has_work


def test_engine_refuses_a_prompt_of_the_wrong_shape(generator: Generator) -> None:
    good = generator.stream(GenerationRequest("Hi.", 0, seed=1))
    bad = dataclasses.replace(good, tokens=good.tokens[:, :5])
    with pytest.raises(ValueError, match=r"^prompt: expected tokens and mask of shape \[T, 33\]"):
        generator.engine.check(bad)
    assert not generator.engine.has_work


def test_all_zero_frame_ends_the_request_and_is_dropped(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Weights edited so that every codebook's logits favour code 0: zeroed layers pass the
    embeddings through, every embedding has a positive first component, and the heads read it."""
    edited = shutil.copytree(tiny_model_dir, tmp_path / "eos")
    state = {name: tensor.clone() for name, tensor in read_state_dict(tiny_model_dir / "model.safetensors").items()}
    for name, tensor in state.items():
        if ".layers." in name and name.endswith("weight"):
            tensor.zero_()
    state["text_embeddings.weight"][:, 0] = 1.0
    state["audio_embeddings.weight"][:, 0] = 1.0
    state["projection.weight"][:] = 0.0
    state["projection.weight"][0, 0] = 1.0
    state["codebook0_head.weight"][:, 0] = 0.0
    state["codebook0_head.weight"][0, 0] = 1000.0
    state["audio_head"][:, 0, :] = 0.0
    state["audio_head"][:, 0, 0] = 1000.0
    save_file(state, edited / "model.safetensors")
    generator = load_csm_1b(edited, device="cpu", slots=2)
    request_id = generator.engine.start(generator.stream(GenerationRequest("Stop at once.", 0, seed=1)))
    assert generator.engine.step() == [StepResult(request_id, None, "eos")]
    assert generator.engine.active_slots == 0
    assert generator.generate_codes("Stop at once.", 0, [], seed=2).shape == (0, 32)
    assert len(generator.generate("Stop at once.", 0, [], seed=2)) == 0


def test_cpu_linear_swap_keeps_the_codes(tiny_model_dir: Path) -> None:
    """load_model packs large Linear weights for oneDNN on the CPU; the tiny model's are below the
    size threshold, so swap them all here and check the model says the same."""
    reference = load_csm_1b(tiny_model_dir, device="cpu", slots=2)
    swapped = load_csm_1b(tiny_model_dir, device="cpu", slots=2)
    quantize(swapped.engine.model, "none", torch.device("cpu"), min_weight_elements=0)
    assert any(isinstance(m, CpuLinear) for m in swapped.engine.model.modules())
    context = [Segment(speaker=1, text="A context turn.")]
    for topk in (1, 50):
        expected = reference.generate_codes("Packed weights.", 0, context, topk=topk, max_audio_length_ms=800, seed=4)
        assert torch.equal(swapped.generate_codes("Packed weights.", 0, context, topk=topk, max_audio_length_ms=800, seed=4), expected)


# Arrivals that move the highest busy slot across batch buckets (1, 2, 4 with 4 slots) and reuse freed slots.
BUCKET_ARRIVALS = ((0, 0), (1, 1), (3, 2), (3, 0), (4, 1), (14, 2))


def bucket_schedule(batch: list[Stream]) -> dict[int, list[Stream]]:
    arrivals: dict[int, list[Stream]] = {}
    for step, which in BUCKET_ARRIVALS:
        arrivals.setdefault(step, []).append(batch[which])
    return arrivals


@pytest.mark.parametrize("topk", [1, 50], ids=["greedy", "sampled"])
def test_fixed_shape_frame_step_gives_the_dynamic_codes(generator: Generator, topk: int) -> None:
    """The step that CUDA graphs capture (every slot below a bucket, all positions under the causal
    mask, dummy rows), run eagerly on the CPU, against the engine's default CPU path."""
    arrivals = bucket_schedule(requests(generator, topk))
    dynamic = run(generator.engine, arrivals)
    fixed_engine = Engine(generator.engine.model, generator.engine.num_slots, frame_graphs=True)
    assert fixed_engine.graphs is not None and not fixed_engine.graphs.capture
    fixed = run(fixed_engine, arrivals)
    assert fixed_engine.stats.peak_batch == generator.engine.num_slots
    for expected, got in zip(dynamic.values(), fixed.values(), strict=True):
        assert torch.equal(expected, got)


@pytest.mark.gpu
def test_cuda_graph_replay_gives_the_eager_greedy_codes(tiny_model_dir: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = load_csm_1b(tiny_model_dir, device="cuda", dtype=torch.float32, slots=4)
    try:
        arrivals = bucket_schedule(requests(generator, topk=1))
        assert generator.engine.graphs is not None and generator.engine.graphs.capture
        replayed = run(generator.engine, arrivals)
        eager = run(Engine(generator.engine.model, 4, frame_graphs=False), arrivals)
        for expected, got in zip(eager.values(), replayed.values(), strict=True):
            assert torch.equal(expected, got)
    finally:
        generator.close()


@pytest.mark.gpu
def test_cuda_bf16_compiled_graphs_serve_every_bucket_through_the_loop(tiny_model_dir: Path) -> None:
    """The default on a GPU: bf16, the frame step compiled and captured for every bucket at load,
    serving requests of several top-k buckets through the serving loop with Mimi; nothing is
    captured while serving."""
    generator = load_csm_1b(tiny_model_dir, device="cuda", slots=4)
    try:
        graphs = generator.engine.graphs
        assert graphs is not None and graphs.capture and generator.engine.model.compiled
        captured = len(graphs._steps)
        assert captured == len(graphs.batch_buckets) * len(graphs.topk_buckets) * len(graphs.length_buckets)
        topks = (1, 50, 100, 300)  # every top-k bucket
        asks = [GenerationRequest(f"Bucket {i}.", i % 2, topk=topk, max_audio_length_ms=640, seed=i) for i, topk in enumerate(topks)]
        codes = generator.generate_codes_batch(asks)
        assert all(0 < len(c) <= 8 for c in codes)
        audio = generator.generate("Heard through the loop.", 0, [], max_audio_length_ms=640, seed=9)
        assert audio.dtype == torch.float32 and audio.numel() % 1920 == 0 and audio.numel() > 0
        assert len(graphs._steps) == captured and {key[1] for key in graphs.runs} >= {64, 256, 2051}
    finally:
        generator.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_an_instance_on_the_second_gpu_captures_and_replays_there(tiny_model_dir: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    first = load_csm_1b(tiny_model_dir, device="cuda:0", dtype=torch.float32, slots=2)
    second = load_csm_1b(tiny_model_dir, device="cuda:1", dtype=torch.float32, slots=2)
    try:
        assert second.engine.graphs.device == torch.device("cuda:1")
        ask = GenerationRequest("On another GPU.", 0, topk=1, max_audio_length_ms=640, seed=3)
        assert torch.equal(first.generate_codes_batch([ask])[0], second.generate_codes_batch([ask])[0])
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("frame_graphs", [False, True], ids=["dynamic", "fixed-shape"])
def test_chunked_prefill_gives_the_same_codes(generator: Generator, frame_graphs: bool) -> None:
    arrivals = bucket_schedule(requests(generator, topk=50))
    whole = run(generator.engine, arrivals)
    chunked = run(Engine(generator.engine.model, generator.engine.num_slots, frame_graphs=frame_graphs, prefill_chunk=5), arrivals)
    for expected, got in zip(whole.values(), chunked.values(), strict=True):
        assert torch.equal(expected, got)


def test_a_long_prompt_prefills_in_pieces_while_running_streams_go_on(generator: Generator) -> None:
    engine = Engine(generator.engine.model, generator.engine.num_slots, prefill_chunk=8)
    short, long = requests(generator, topk=50)[:2]
    running = engine.start(short)
    engine.step()
    waiting = engine.start(long)
    steps_to_first_frame = 0
    while True:
        results = engine.step()
        steps_to_first_frame += 1
        assert running in {result.request_id for result in results}  # a frame every step
        if waiting in {result.request_id for result in results}:
            break
    assert steps_to_first_frame == -(-len(long.tokens) // 8)
    for request_id in (running, waiting):
        engine.cancel(request_id)
    engine.step()
    assert engine.active_slots == 0


def run_logged(engine: Engine, arrivals: dict[int, list[Stream]], cancels: dict[int, int]) -> tuple[list[torch.Tensor], list]:
    """`run`, cancelling the `cancels[step]`-th submitted request at that step: each request's
    codes in the order submitted, and the frame step's bucket at each step (None for a step that
    ran none)."""
    frames: dict[int, list[torch.Tensor]] = {}
    submitted: list[int] = []
    waiting: deque[Stream] = deque()
    buckets = []
    step = 0
    while step <= max(arrivals) or waiting or engine.has_work:
        waiting.extend(arrivals.get(step, []))
        for request_id in admit(engine, waiting):
            submitted.append(request_id)
            frames[request_id] = []
        if step in cancels:
            engine.cancel(submitted[cancels[step]])
        before = engine.graphs.runs.copy() if engine.graphs else None
        for result in engine.step():
            if result.codes is not None:
                frames[result.request_id].append(result.codes)
        if engine.graphs is not None:
            ran = engine.graphs.runs - before
            buckets.append(next(iter(ran)) if ran else None)
        step += 1
    return [torch.stack(frames[rid]) if frames[rid] else torch.zeros(0, 32, dtype=torch.long) for rid in submitted], buckets


def test_the_frame_step_compacts_its_slots_and_runs_the_smallest_buckets_that_hold_them(generator: Generator) -> None:
    """Slot 0's stream is cancelled while slots 1 and 2 run: slot 2 moves to row 0 (KV cache and
    device state), the batch bucket drops from 4 to 2, and every code stays what the dynamic
    path makes; the length bucket is the smallest that holds the longest stream."""
    batch = requests(generator, topk=50)
    arrivals, cancels = {0: batch}, {6: 0}
    dynamic, _ = run_logged(generator.engine, arrivals, cancels)
    fixed_engine = Engine(generator.engine.model, generator.engine.num_slots, frame_graphs=True)
    fixed, buckets = run_logged(fixed_engine, arrivals, cancels)
    for expected, got in zip(dynamic, fixed, strict=True):
        assert torch.equal(expected, got)
    assert len(dynamic[0]) == 6  # a frame a step, steps 0 to 5
    longest = max(len(request.tokens) for request in batch)
    assert buckets[5] == (4, 64, 64 if longest + 5 < 64 else 128)  # slots 0, 1, 2 in the batch-4 graph
    assert buckets[6] == (2, 64, buckets[5][2])  # cancelled, then compacted: rows 0 and 1
    positions = {bucket[2] for bucket in buckets if bucket is not None}
    assert positions <= {64, 128} and fixed_engine.graphs.state.uploads == 1  # all three start in one upload


def test_a_one_position_prompt_starts_on_the_frame_step(generator: Generator) -> None:
    """A prompt of one position has nothing to prefill: its first frame comes from the frame step."""
    request = Stream(
        tokens=torch.zeros(1, 33, dtype=torch.long), mask=torch.ones(1, 33, dtype=torch.bool), max_frames=3, temperature=1.0, topk=1, seed=0
    )
    dynamic = run(generator.engine, {0: [request]})
    fixed = run(Engine(generator.engine.model, generator.engine.num_slots, frame_graphs=True), {0: [request]})
    assert torch.equal(next(iter(dynamic.values())), next(iter(fixed.values())))
