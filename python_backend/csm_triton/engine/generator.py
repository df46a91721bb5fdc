"""The design document's in-process API: `load_csm_1b` and `Generator.generate` (its `Segment` and
`GenerationRequest` are in request.py, with the limits every request is checked against).

A Generator owns one serving loop (engine + audio decoder threads); `generate` is a batch of one,
`generate_batch` runs many requests together, `generate_streaming` and `generate_async` are the
design document's extensions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from csm_client.contract import SAMPLE_RATE

from ..model import checkpoint
from ..model.codec import MimiCodec, StreamingDecoder
from ..model.config import DEFAULT_PREFIX_CACHE_MB, MIB
from ..model.quantize import check_scheme
from ..request import GenerationRequest, RequestLimits, Segment, check_chunking
from .engine import Engine
from .pacing import ADAPTIVE, STALL_TIMEOUT_S, ChunkPlan, chunk_plan
from .prompt import CodesCache, PromptBuilder, TextTokenizer
from .stream import Chunk, Stream
from .streaming import LoopStats, ServingLoop

logger = logging.getLogger(__name__)

DEFAULT_SLOTS = 8
# Prompt positions prefilled per step on CUDA: a few milliseconds of the 1B backbone on an H100,
# so a burst of long prompts never holds the running streams' next frame past its 80 ms.
CUDA_PREFILL_CHUNK = 512


class Generator:
    """The in-process API over one serving loop: every call, blocking, streaming or async, joins
    the same running batch, so many threads or tasks can share one Generator."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        engine: Engine,
        prompts: PromptBuilder,
        codec: MimiCodec,
        cpu_threads: int | None = None,
        limits: RequestLimits | None = None,
        max_waiting: int | None = None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.prompts = prompts
        self.codec = codec
        self.limits = limits or RequestLimits.for_model(engine.model.config)
        # The voice library: name -> its clip's segment, codes encoded once (GenerationRequest.voice).
        self.voices: dict[str, Segment] = {}
        rows = 2 * engine.num_slots
        self.loop = ServingLoop(engine, StreamingDecoder(codec, rows), rows, cpu_threads, max_waiting, stall_timeout_s)

    def prompt(self, text: str, speaker: int, context: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """The 33-column prompt frames (tokens [T, 33], mask [T, 33]) the model is given."""
        return self.prompts.build(text, speaker, list(context))

    def _check(self, request: GenerationRequest, chunking: ChunkPlan) -> None:
        """The in-process API's edge: every bound, on counts alone (a ValueError naming the field)."""
        self.limits.check(request)
        check_chunking(chunking.first_frames, chunking.max_frames, self.limits.max_audio_length_ms)
        if request.voice is not None:
            if request.voice not in self.voices:
                raise ValueError(
                    f"voice: no voice {request.voice[:80]!r} in the voice library; its voices: {', '.join(sorted(self.voices))}"
                )
            self.limits.check_segment_count(len(request.context) + 1)

    def stream(
        self,
        request: GenerationRequest,
        deliver: Callable[[Chunk], None] | None = None,
        decode_audio: bool = True,
        chunking: ChunkPlan = ADAPTIVE,
    ) -> Stream:
        """The request's stream, once its prompt is known to fit the model (a ValueError
        "prompt: ..." otherwise), the one check that needs the tokenizer; under context_overflow
        "drop_oldest", once the oldest context segments that keep it from fitting are left out
        (`Stream.context_dropped`). Context audio is left for the loop's generation thread to
        resample and encode (`Stream.prepare`), so that the caller's thread (the engine process's
        reader) is not held by it."""
        pinned = request.context_pinned
        if request.voice is not None:
            request = dataclasses.replace(request, context=[self.voices[request.voice], *request.context], voice=None)
            pinned += 1
        dropped = 0
        if request.context_overflow == "drop_oldest":
            request, dropped = self._fit_context(request, pinned)
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        sampling = (request.max_frames, request.temperature, request.topk, seed)
        stream = Stream(None, None, *sampling, deliver, decode_audio, chunking, context_dropped=dropped)
        if not any(segment.audio is not None for segment in request.context):
            stream.tokens, stream.mask = self.prompt(request.text, request.speaker, request.context)
            self.engine.check(stream)
            return stream
        self.engine.check_fields(self.prompts.positions(request.text, request.speaker, request.context), request.max_frames)
        stream.prepare = functools.partial(self.prompt, request.text, request.speaker, request.context)
        return stream

    def _fit_context(self, request: GenerationRequest, pinned: int) -> tuple[GenerationRequest, int]:
        """The request without as few of its oldest context segments after the first `pinned` as
        let its prompt fit with room for its frames, and how many it left out, counted without
        encoding anything. Raises ValueError "prompt: ..." when it does not fit without any of them."""
        context = request.context
        sizes = [self.prompts.segment_positions(segment) for segment in context]
        room = self.limits.prompt_room(request.max_frames)
        excess = self.prompts.positions(request.text, request.speaker, []) + sum(sizes) - room
        dropped = 0
        while excess > 0 and pinned + dropped < len(context):
            excess -= sizes[pinned + dropped]
            dropped += 1
        if excess > 0:
            raise ValueError(
                f"prompt: {room + excess} positions of pinned context and text plus up to {request.max_frames} frames exceed the "
                f"model's {self.limits.max_positions}-position limit even with all unpinned context segments ({dropped}) dropped "
                "(context_overflow 'drop_oldest'); pin fewer segments, or shorten the text or the maximum audio length"
            )
        return dataclasses.replace(request, context=[*context[:pinned], *context[pinned + dropped :]]), dropped

    def submit(
        self, request: GenerationRequest, deliver: Callable[[Chunk], None], decode_audio: bool = True, chunking: ChunkPlan = ADAPTIVE
    ) -> Stream:
        """Start generating; `deliver` gets the chunks in order from the loop's threads, cut as
        `chunking` says (default: the adaptive schedule, pacing.py). Raises ValueError naming the
        field for a request that cannot run."""
        self._check(request, chunking)
        return self.start_checked(request, deliver, decode_audio, chunking)

    def start_checked(
        self, request: GenerationRequest, deliver: Callable[[Chunk], None], decode_audio: bool, chunking: ChunkPlan
    ) -> Stream:
        """`submit` for a request already checked against `self.limits` at its edge (the Triton
        stub's serving.read_request): only the prompt's fit to the model is checked here."""
        return self.loop.add(self.stream(request, deliver, decode_audio, chunking))

    def cancel(self, stream: Stream) -> None:
        self.loop.cancel(stream)

    def stats(self) -> LoopStats:
        return self.loop.stats()

    def health(self) -> str | None:
        """None while requests can be served; otherwise why not (see ServingLoop.health)."""
        return self.loop.health()

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancel what is running and stop the loop's threads."""
        self.loop.close(timeout_s)

    def _run_batch(self, requests: list[GenerationRequest], decode_audio: bool, return_exceptions: bool) -> list[Chunk | Exception]:
        """Each request's whole output as one Chunk, all generated in the running batch."""
        outcomes: list[Chunk | Exception | None] = [None] * len(requests)
        chunks: dict[int, list[Chunk]] = {}
        prepared: dict[int, Stream] = {}
        for index, request in enumerate(requests):
            chunks[index] = []
            try:
                whole = ChunkPlan.whole(request.max_frames)
                self._check(request, whole)
                prepared[index] = self.stream(request, chunks[index].append, decode_audio, whole)
            except ValueError as error:
                if not return_exceptions:
                    raise
                outcomes[index] = error
        streams = {index: self.loop.add(stream) for index, stream in prepared.items()}
        for index, stream in streams.items():
            stream.finished.wait()
            try:
                outcomes[index] = _joined(chunks[index])
            except RuntimeError as error:
                if not return_exceptions:
                    raise
                outcomes[index] = error
        return outcomes

    def generate_codes_batch(self, requests: list[GenerationRequest], return_exceptions: bool = False) -> list[torch.Tensor | Exception]:
        """Codes [frames, 32] for each request, generated in one running batch. With
        `return_exceptions`, an invalid request yields its ValueError in its place and the others
        still run; without, the first invalid request raises before anything runs."""
        outcomes = self._run_batch(requests, decode_audio=False, return_exceptions=return_exceptions)
        return [outcome if isinstance(outcome, Exception) else outcome.codes for outcome in outcomes]

    def generate_batch(self, requests: list[GenerationRequest]) -> list[torch.Tensor]:
        """Audio [samples] at 24 kHz for each request, generated together."""
        return [chunk.audio for chunk in self._run_batch(requests, decode_audio=True, return_exceptions=False)]

    def generate_codes(
        self,
        text: str,
        speaker: int,
        context: list[Segment],
        temperature: float = GenerationRequest.temperature,
        topk: int = GenerationRequest.topk,
        max_audio_length_ms: int = GenerationRequest.max_audio_length_ms,
        seed: int | None = None,
        *,
        context_overflow: str = GenerationRequest.context_overflow,
        context_pinned: int = GenerationRequest.context_pinned,
    ) -> torch.Tensor:
        """The sampled Mimi codes [frames, 32], the end-of-audio frame excluded. `context_overflow`
        "drop_oldest" leaves out the oldest context segments but the first `context_pinned` until
        the prompt fits (GenerationRequest), as for every method below."""
        request = GenerationRequest(
            text, speaker, context, temperature, topk, max_audio_length_ms, seed,
            context_overflow=context_overflow, context_pinned=context_pinned,
        )  # fmt: skip
        return self.generate_codes_batch([request])[0]

    def generate(
        self,
        text: str,
        speaker: int,
        context: list[Segment],
        temperature: float = GenerationRequest.temperature,
        topk: int = GenerationRequest.topk,
        max_audio_length_ms: int = GenerationRequest.max_audio_length_ms,
        seed: int | None = None,
        *,
        context_overflow: str = GenerationRequest.context_overflow,
        context_pinned: int = GenerationRequest.context_pinned,
    ) -> torch.Tensor:
        """Speak `text` as `speaker` after `context`: mono float32 audio [samples] at 24 kHz."""
        request = GenerationRequest(
            text, speaker, context, temperature, topk, max_audio_length_ms, seed,
            context_overflow=context_overflow, context_pinned=context_pinned,
        )  # fmt: skip
        return self.generate_batch([request])[0]

    def generate_streaming(
        self,
        text: str,
        speaker: int,
        context: list[Segment],
        temperature: float = GenerationRequest.temperature,
        topk: int = GenerationRequest.topk,
        max_audio_length_ms: int = GenerationRequest.max_audio_length_ms,
        seed: int | None = None,
        first_chunk_frames: int | None = None,
        chunk_frames: int | None = None,
        *,
        context_overflow: str = GenerationRequest.context_overflow,
        context_pinned: int = GenerationRequest.context_pinned,
    ) -> Iterator[torch.Tensor]:
        """Audio chunks [samples] as they are generated; joined, they are `generate`'s audio.
        The first holds `first_chunk_frames` frames of 80 ms (default 2); later ones hold
        `chunk_frames` each if given, or else as many as keep ahead of playback, up to 12 (the
        adaptive schedule, pacing.py). Closing the iterator early cancels the generation."""
        request = GenerationRequest(
            text, speaker, context, temperature, topk, max_audio_length_ms, seed,
            context_overflow=context_overflow, context_pinned=context_pinned,
        )  # fmt: skip
        chunks: queue.Queue[Chunk] = queue.Queue()
        stream = self.submit(request, chunks.put, True, chunk_plan(first_chunk_frames, chunk_frames, ADAPTIVE))
        return self._chunks_of(stream, chunks)

    def _chunks_of(self, stream: Stream, chunks: queue.Queue[Chunk]) -> Iterator[torch.Tensor]:
        try:
            while True:
                chunk = chunks.get()
                _raise_for(chunk)
                if len(chunk.audio):
                    yield chunk.audio
                if chunk.finish is not None:
                    return
        finally:
            if not stream.finished.is_set():
                self.cancel(stream)

    async def generate_async(
        self,
        text: str,
        speaker: int,
        context: list[Segment],
        temperature: float = GenerationRequest.temperature,
        topk: int = GenerationRequest.topk,
        max_audio_length_ms: int = GenerationRequest.max_audio_length_ms,
        seed: int | None = None,
        *,
        context_overflow: str = GenerationRequest.context_overflow,
        context_pinned: int = GenerationRequest.context_pinned,
    ) -> torch.Tensor:
        """`generate` for asyncio: awaiting does not block the event loop, and cancelling the
        task cancels the generation."""
        request = GenerationRequest(
            text, speaker, context, temperature, topk, max_audio_length_ms, seed,
            context_overflow=context_overflow, context_pinned=context_pinned,
        )  # fmt: skip
        event_loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Chunk]] = event_loop.create_future()
        pieces: list[Chunk] = []

        def deliver(chunk: Chunk) -> None:
            pieces.append(chunk)
            if chunk.finish is not None:
                event_loop.call_soon_threadsafe(lambda: done.done() or done.set_result(pieces))

        stream = self.submit(request, deliver, chunking=ChunkPlan.whole(request.max_frames))
        try:
            return _joined(await done).audio
        except asyncio.CancelledError:
            self.cancel(stream)
            raise


def _raise_for(chunk: Chunk) -> None:
    if chunk.error is not None:
        raise RuntimeError(f"generation failed: {chunk.error}") from chunk.error


def _joined(chunks: list[Chunk]) -> Chunk:
    """A stream's chunks as one; raises if it ended in an error."""
    for chunk in chunks:
        _raise_for(chunk)
    audio = None if chunks[-1].audio is None else torch.cat([chunk.audio for chunk in chunks])
    return Chunk(torch.cat([chunk.codes for chunk in chunks]), audio, chunks[-1].finish)


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} was asked for but CUDA is not available here; pass device='cpu'")
    return device


def load_csm_1b(
    ckpt_path: str | Path = "ckpt.pt",
    device: str | torch.device = "cuda",
    dtype: torch.dtype | None = None,
    slots: int = DEFAULT_SLOTS,
    cpu_threads: int | None = None,
    prefill_chunk: int | None = None,
    limits: RequestLimits | None = None,
    max_waiting: int | None = None,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    compile: bool | None = None,
    codes_cache_bytes: int | None = None,
    quantize: str | None = None,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_MB * MIB,
) -> Generator:
    """Load a staged model directory, `ckpt.pt` or `model.safetensors` (tokenizer and Mimi beside
    it). Weights are bf16 on CUDA and fp32 on the CPU unless `dtype` says otherwise. On the CPU,
    generation and audio decoding each use `cpu_threads` torch threads (default half the cores).
    A step prefills at most `prefill_chunk` prompt positions (default: CUDA_PREFILL_CHUNK on CUDA,
    whole prompts on the CPU, where a step's cost hardly depends on them). Every request is checked
    against `limits` (default: RequestLimits' defaults for the loaded model). `max_waiting` and
    `stall_timeout_s` are the serving loop's (ServingLoop); `compile` the engine's (Engine).
    `codes_cache_bytes` bounds the Mimi codes of context audio kept (CodesCache; None: its default).
    `quantize` is how the linear layers are stored and run (model/quantize.py: "none", "bf16" or
    "int8" on the CPU, "none", "int8" or "fp8" on CUDA; None: "int8" for a directory that holds
    only `python -m export quantize`'s int8 weights, else "none"). `prefix_cache_bytes` bounds the
    keys and values of prompt prefixes kept for the next turn of a conversation (engine/prefix_pool.py;
    0: every prompt is prefilled whole)."""
    device = resolve_device(device)
    if device.type == "cuda":  # before anything is allocated or captured: the instance's GPU, not cuda:0
        torch.cuda.set_device(device)
    paths = checkpoint.resolve(ckpt_path)
    quantize = quantize or paths.default_scheme()
    check_scheme(quantize, device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = checkpoint.load_model(paths, device, dtype, quantize)
    codec = MimiCodec(paths.mimi, device, model.config.audio_num_codebooks)
    prompts = PromptBuilder(
        TextTokenizer(paths.tokenizer), codec, model.config.audio_num_codebooks, model.config.text_vocab_size, CodesCache(codes_cache_bytes)
    )
    if prefill_chunk is None and device.type == "cuda":
        prefill_chunk = CUDA_PREFILL_CHUNK
    engine = Engine(model, slots, prefill_chunk=prefill_chunk, compile=compile, prefix_pool_bytes=prefix_cache_bytes)
    return Generator(engine, prompts, codec, cpu_threads, limits, max_waiting, stall_timeout_s)
