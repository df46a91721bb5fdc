"""The Triton model's contract: its settings, and requests read from named input arrays.

Kept free of `triton_python_backend_utils` so that the parsing is testable outside a server and
`model.py` stays a thin adapter. Every error is a ValueError whose message starts with the
tensor's name, which the model returns as INVALID_ARG for that request alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .codec import SAMPLE_RATE
from .config import ModelConfig
from .generator import FRAME_MS, GenerationRequest
from .model import kv_cache_bytes_per_slot
from .prompt import Segment
from .streaming import CHUNK_FRAMES, FIRST_CHUNK_FRAMES

INPUTS = (
    "TEXT",
    "SPEAKER",
    "CONTEXT_TEXT",
    "CONTEXT_SPEAKER",
    "CONTEXT_AUDIO",
    "CONTEXT_AUDIO_LENGTHS",
    "CONTEXT_SAMPLE_RATE",
    "TEMPERATURE",
    "TOPK",
    "MAX_AUDIO_LENGTH_MS",
    "SEED",
    "FIRST_CHUNK_FRAMES",
    "CHUNK_FRAMES",
)

# Parameters the python backend itself reads (a packed environment for the stub); not the model's.
BACKEND_PARAMETERS = frozenset({"EXECUTION_ENV_PATH"})
MIB = 1 << 20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingConfig:
    """The model's `parameters` in config.pbtxt."""

    model_dir: str = ""
    tiny_model_dir: str = "models/tiny"
    device: str = "auto"
    dtype: str = "auto"
    slots: int = 8
    max_audio_length_ms: int = 30_000
    first_chunk_frames: int = FIRST_CHUNK_FRAMES
    chunk_frames: int = CHUNK_FRAMES
    cpu_threads: int = 0  # 0: half the cores for each of the serving loop's two threads
    prefill_chunk: int = 0  # prompt positions prefilled per step at most; 0: load_csm_1b's default
    kv_cache_memory_mb: int = 0  # MiB the KV caches of all slots may take; 0: no bound
    max_waiting_requests: int = 32  # requests waiting for a slot at most; more are refused as busy
    stall_timeout_s: float = 120.0  # a serving-loop round longer than this: the engine is hung
    max_engine_restarts: int = 3  # engine processes that may end within engine_restart_window_s
    engine_restart_window_s: float = 600.0
    engine_start_timeout_s: float = 900.0  # loading the engine longer than this fails the load

    @classmethod
    def from_parameters(cls, parameters: dict[str, dict[str, str]]) -> ServingConfig:
        """Triton gives parameters as {"key": {"string_value": "..."}}."""
        values = {key: value["string_value"] for key, value in parameters.items() if key not in BACKEND_PARAMETERS}
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config.pbtxt parameters: unknown keys {sorted(unknown)}")
        kinds = {"int": int, "float": float, "str": str}
        typed = {key: kinds[cls.__dataclass_fields__[key].type](value) for key, value in values.items()}
        config = cls(**typed)
        if config.max_audio_length_ms < FRAME_MS or min(config.slots, config.first_chunk_frames, config.chunk_frames) < 1:
            raise ValueError("config.pbtxt parameters: slots and chunk frames must be >= 1 and max_audio_length_ms >= 80")
        if min(config.max_waiting_requests, config.stall_timeout_s, config.engine_start_timeout_s) <= 0 or config.max_engine_restarts < 0:
            raise ValueError("config.pbtxt parameters: max_waiting_requests and the timeouts must be > 0, max_engine_restarts >= 0")
        if config.kv_cache_memory_mb < 0:
            raise ValueError(f"kv_cache_memory_mb: must be >= 0 (0: no bound), got {config.kv_cache_memory_mb}")
        return config

    def kv_cache_slots(self, model: ModelConfig, dtype: torch.dtype) -> int:
        """`slots`, or as many as `kv_cache_memory_mb` holds the KV caches of when that is fewer:
        the caches' memory is fixed at load, so a server shared with other models can bound it.
        Raises a ValueError naming the parameter when not even one slot fits."""
        per_slot = kv_cache_bytes_per_slot(model, dtype)
        fitting = self.kv_cache_memory_mb * MIB // per_slot if self.kv_cache_memory_mb else self.slots
        if fitting < 1:
            raise ValueError(
                f"kv_cache_memory_mb: {self.kv_cache_memory_mb} MiB holds no slot; one slot's KV caches take "
                f"{per_slot / MIB:.2f} MiB in {dtype}. Raise it, or set 0 for no bound"
            )
        slots = min(self.slots, fitting)
        logger.info(
            "KV caches: %d bytes (%.2f MiB) a slot in %s; %d slots, %.1f MiB in all (slots %d, kv_cache_memory_mb %d)",
            per_slot,
            per_slot / MIB,
            dtype,
            slots,
            slots * per_slot / MIB,
            self.slots,
            self.kv_cache_memory_mb,
        )
        return slots

    def weights_dir(self, project_root: Path) -> tuple[Path, bool]:
        """(directory to load, whether it is the staged real model). Relative paths are taken
        from `project_root`."""
        staged = project_root / self.model_dir
        if self.model_dir and (staged / "config.json").exists():
            return staged, True
        return project_root / self.tiny_model_dir, False


def _single(arrays: dict[str, np.ndarray], name: str, default=None):
    """A scalar input: shape [1] or [1, 1] (the batch dimension of one request)."""
    if name not in arrays:
        if default is None:
            raise ValueError(f"{name}: required input is missing")
        return default
    array = arrays[name]
    if array.size != 1:
        raise ValueError(f"{name}: expected one value per request, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _vector(arrays: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """A per-request list input: shape [1, n] (batch dimension first) or [n]."""
    if name not in arrays:
        return None
    array = arrays[name]
    if array.ndim == 2 and array.shape[0] == 1:
        return array[0]
    if array.ndim != 1:
        raise ValueError(f"{name}: expected shape [1, n] for one request, got {list(array.shape)}")
    return array


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{name}: not valid UTF-8 ({error.reason} at byte {error.start})") from error
    return str(value)


def _context(arrays: dict[str, np.ndarray]) -> list[Segment]:
    texts = _vector(arrays, "CONTEXT_TEXT")
    speakers = _vector(arrays, "CONTEXT_SPEAKER")
    lengths = _vector(arrays, "CONTEXT_AUDIO_LENGTHS")
    audio = _vector(arrays, "CONTEXT_AUDIO")
    texts = texts if texts is not None else np.zeros(0, dtype=object)
    speakers = speakers if speakers is not None else np.zeros(0, dtype=np.int32)
    lengths = lengths if lengths is not None else np.zeros(len(texts), dtype=np.int32)
    audio = audio if audio is not None else np.zeros(0, dtype=np.float32)
    if not len(texts) == len(speakers) == len(lengths):
        raise ValueError(
            f"CONTEXT_TEXT, CONTEXT_SPEAKER, CONTEXT_AUDIO_LENGTHS: one entry per context segment, "
            f"got {len(texts)}, {len(speakers)} and {len(lengths)}"
        )
    if (lengths < 0).any():
        raise ValueError("CONTEXT_AUDIO_LENGTHS: sample counts must be >= 0")
    if int(lengths.sum()) != len(audio):
        raise ValueError(f"CONTEXT_AUDIO_LENGTHS: sums to {int(lengths.sum())} samples but CONTEXT_AUDIO holds {len(audio)}")
    if not np.isfinite(audio).all():
        raise ValueError("CONTEXT_AUDIO: samples must be finite (found NaN or infinity)")
    sample_rate = int(_single(arrays, "CONTEXT_SAMPLE_RATE", SAMPLE_RATE))
    if sample_rate <= 0:
        raise ValueError(f"CONTEXT_SAMPLE_RATE: must be > 0, got {sample_rate}")
    segments, offset = [], 0
    for index, (text, speaker, length) in enumerate(zip(texts, speakers, lengths, strict=True)):
        clip = audio[offset : offset + length] if length else None
        offset += length
        try:
            segments.append(Segment(int(speaker), _text(text, f"CONTEXT_TEXT[{index}]"), clip, sample_rate=sample_rate))
        except ValueError as error:
            raise ValueError(f"CONTEXT (segment {index}): {error}") from error
    return segments


def parse_request(arrays: dict[str, np.ndarray], config: ServingConfig, vocab_size: int) -> GenerationRequest:
    """One Triton request's input arrays -> a validated GenerationRequest."""
    text = _text(_single(arrays, "TEXT"), "TEXT")
    if not text.strip():
        raise ValueError("TEXT: must not be empty")
    speaker = int(_single(arrays, "SPEAKER"))
    if speaker < 0:
        raise ValueError(f"SPEAKER: must be >= 0, got {speaker}")
    temperature = float(_single(arrays, "TEMPERATURE", 0.9))
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"TEMPERATURE: must be a finite number > 0, got {temperature}")
    topk = int(_single(arrays, "TOPK", 50))
    if not 1 <= topk <= vocab_size:
        raise ValueError(f"TOPK: must be in [1, {vocab_size}], got {topk}")
    max_ms = int(_single(arrays, "MAX_AUDIO_LENGTH_MS", min(10_000, config.max_audio_length_ms)))
    if not FRAME_MS <= max_ms <= config.max_audio_length_ms:
        raise ValueError(f"MAX_AUDIO_LENGTH_MS: must be in [{FRAME_MS}, {config.max_audio_length_ms}], got {max_ms}")
    seed = int(_single(arrays, "SEED")) if "SEED" in arrays else None
    return GenerationRequest(text, speaker, _context(arrays), temperature, topk, max_ms, seed)


def parse_chunking(arrays: dict[str, np.ndarray], config: ServingConfig) -> tuple[int, int]:
    """(frames in the first audio chunk, frames in each later chunk) for a streaming request."""
    most = config.max_audio_length_ms // FRAME_MS
    chunking = []
    for name, default in (("FIRST_CHUNK_FRAMES", config.first_chunk_frames), ("CHUNK_FRAMES", config.chunk_frames)):
        frames = int(_single(arrays, name, default))
        if not 1 <= frames <= most:
            raise ValueError(f"{name}: must be in [1, {most}] frames of 80 ms, got {frames}")
        chunking.append(frames)
    return chunking[0], chunking[1]
