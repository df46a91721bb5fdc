"""The design document's in-process API: `load_csm_1b`, `Generator.generate`, `Segment`.

A Generator owns one engine; `generate` is a batch of one, `generate_batch` runs many requests in
the same running batch.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .codec import SAMPLE_RATE, MimiCodec
from .engine import Engine, EngineRequest
from .prompt import PromptBuilder, Segment, TextTokenizer, check_speaker, check_text

logger = logging.getLogger(__name__)

FRAME_MS = 80  # one Mimi frame at 12.5 Hz
DEFAULT_SLOTS = 8


@dataclass
class GenerationRequest:
    """One utterance to speak, with the design document's parameters and defaults."""

    text: str
    speaker: int
    context: list[Segment] = field(default_factory=list)
    temperature: float = 0.9
    topk: int = 50
    max_audio_length_ms: int = 10_000
    seed: int | None = None

    def __post_init__(self) -> None:
        check_text(self.text, "text")
        check_speaker(self.speaker, "speaker")
        if not isinstance(self.context, (list, tuple)):
            raise ValueError(f"context: must be a list of Segment, got {type(self.context).__name__}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature: must be a finite number > 0, got {self.temperature!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk: must be an integer >= 1, got {self.topk!r}")
        if (
            isinstance(self.max_audio_length_ms, bool)
            or not isinstance(self.max_audio_length_ms, int)
            or self.max_audio_length_ms < FRAME_MS
        ):
            raise ValueError(f"max_audio_length_ms: must be an integer >= {FRAME_MS} (one frame), got {self.max_audio_length_ms!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed: must be an integer or None, got {self.seed!r}")

    @property
    def max_frames(self) -> int:
        return self.max_audio_length_ms // FRAME_MS


class Generator:
    sample_rate = SAMPLE_RATE

    def __init__(self, engine: Engine, prompts: PromptBuilder, codec: MimiCodec) -> None:
        self.engine = engine
        self.prompts = prompts
        self.codec = codec
        self._lock = threading.Lock()  # one caller drives the engine at a time

    def prompt(self, text: str, speaker: int, context: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """The 33-column prompt frames (tokens [T, 33], mask [T, 33]) the model is given."""
        return self.prompts.build(text, speaker, list(context))

    def engine_request(self, request: GenerationRequest) -> EngineRequest:
        tokens, mask = self.prompt(request.text, request.speaker, request.context)
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        engine_request = EngineRequest(tokens, mask, request.max_frames, float(request.temperature), request.topk, seed)
        self.engine.check(engine_request)
        return engine_request

    def generate_codes_batch(self, requests: list[GenerationRequest], return_exceptions: bool = False) -> list[torch.Tensor | Exception]:
        """Codes [frames, 32] for each request, generated in one running batch. With
        `return_exceptions`, an invalid request yields its ValueError in its place and the others
        still run; without, the first invalid request raises before anything runs."""
        outcomes: list[torch.Tensor | Exception | None] = [None] * len(requests)
        prepared: dict[int, EngineRequest] = {}
        for index, request in enumerate(requests):
            try:
                prepared[index] = self.engine_request(request)
            except ValueError as error:
                if not return_exceptions:
                    raise
                outcomes[index] = error
        frames: dict[int, list[torch.Tensor]] = {index: [] for index in prepared}
        with self._lock:
            owner = {self.engine.submit(request): index for index, request in prepared.items()}
            remaining = set(owner)
            while remaining:
                for result in self.engine.step():
                    if result.request_id not in owner:
                        continue
                    if result.codes is not None:
                        frames[owner[result.request_id]].append(result.codes)
                    if result.finish is not None:
                        remaining.discard(result.request_id)
        for index, collected in frames.items():
            outcomes[index] = torch.stack(collected) if collected else torch.zeros(0, self.engine.num_codebooks, dtype=torch.long)
        return outcomes

    def generate_batch(self, requests: list[GenerationRequest]) -> list[torch.Tensor]:
        """Audio [samples] at 24 kHz for each request, generated together."""
        return self.codec.decode_batch(self.generate_codes_batch(requests))

    def generate_codes(
        self,
        text: str,
        speaker: int,
        context: list[Segment],
        temperature: float = 0.9,
        topk: int = 50,
        max_audio_length_ms: int = 10_000,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The sampled Mimi codes [frames, 32], the end-of-audio frame excluded."""
        request = GenerationRequest(text, speaker, list(context), temperature, topk, max_audio_length_ms, seed)
        return self.generate_codes_batch([request])[0]

    def generate(
        self,
        text: str,
        speaker: int,
        context: list[Segment],
        temperature: float = 0.9,
        topk: int = 50,
        max_audio_length_ms: int = 10_000,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Speak `text` as `speaker` after `context`: mono float32 audio [samples] at 24 kHz."""
        return self.codec.decode(self.generate_codes(text, speaker, context, temperature, topk, max_audio_length_ms, seed))


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} was asked for but CUDA is not available here; pass device='cpu'")
    return device


def load_csm_1b(
    ckpt_path: str | Path = "ckpt.pt", device: str | torch.device = "cuda", dtype: torch.dtype | None = None, slots: int = DEFAULT_SLOTS
) -> Generator:
    """Load a staged model directory, `ckpt.pt` or `model.safetensors` (tokenizer and Mimi beside
    it). Weights are bf16 on CUDA and fp32 on the CPU unless `dtype` says otherwise."""
    device = resolve_device(device)
    paths = checkpoint.resolve(ckpt_path)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = checkpoint.load_model(paths, device, dtype)
    codec = MimiCodec(paths.mimi, device, model.config.audio_num_codebooks)
    prompts = PromptBuilder(TextTokenizer(paths.tokenizer), codec, model.config.audio_num_codebooks, model.config.text_vocab_size)
    return Generator(Engine(model, slots), prompts, codec)
