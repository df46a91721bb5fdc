"""The Triton model's settings, and requests read from named input arrays (whose table, with every
other fact the callers share, is the wire contract's: csm_client.contract.INPUTS).

Torch-free and free of `triton_python_backend_utils`, so that reading is testable outside a server
and the csm_stream model (csm_stream.py) only passes tensors on. Every input is checked for its
type and shape before any of its values is read, and all of them together for their size; the
values are then checked by the shared `RequestLimits.check`. Every error is a ValueError whose
message starts with the tensor's name, which the model returns as INVALID_ARG for that request
alone. Turn references (csm_client.turns) are opened here, and a stream's own is signed here
(`TurnOutput`), with the turn key that stays in the stub's process.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from csm_client import turns
from csm_client.contract import AUDIO_NUM_CODEBOOKS, CHUNK_FRAMES, FIRST_CHUNK_FRAMES, FRAME_MS, INPUTS, STREAM_INPUTS
from csm_client.segment import mono_samples

from ..engine.pacing import STALL_TIMEOUT_S, ChunkPlan, chunk_plan
from ..model.config import DEFAULT_PREFIX_CACHE_MB, QUANTIZE_SCHEMES, ModelConfig
from ..request import GenerationRequest, RequestLimits, Segment, check_chunking

_BYTES = np.dtype(object)

# The request's fields as Triton inputs name them (see request.API_NAMES): the words a message
# about each starts with. A context segment's fields name their segment; the sample rate is one
# value for the whole request.
TRITON_NAMES = {
    "text": "TEXT:",
    "speaker": "SPEAKER:",
    "context": "CONTEXT_TEXT:",
    "context.text": "CONTEXT_TEXT: segment {index}",
    "context.speaker": "CONTEXT_SPEAKER: segment {index}",
    "context.audio": "CONTEXT_AUDIO: segment {index}",
    "context.sample_rate": "CONTEXT_SAMPLE_RATE:",
    "context.codes": "CONTEXT_CODES: segment {index}",
    "temperature": "TEMPERATURE:",
    "topk": "TOPK:",
    "max_audio_length_ms": "MAX_AUDIO_LENGTH_MS:",
    "seed": "SEED:",
    "first_chunk_frames": "FIRST_CHUNK_FRAMES:",
    "chunk_frames": "CHUNK_FRAMES:",
    "voice": "VOICE:",
    "context_overflow": "CONTEXT_OVERFLOW:",
    "context_pinned": "CONTEXT_PINNED:",
}

# Parameters the python backend itself reads (a packed environment for the stub); not the model's.
BACKEND_PARAMETERS = frozenset({"EXECUTION_ENV_PATH"})


COMPILE = {"auto": None, "on": True, "off": False}  # the compile parameter, as Engine takes it

TURN_KEY_ENV = "CSM_TURN_KEY"  # overrides the turn_key parameter: a Secret's value, kept out of config.pbtxt


@dataclass(frozen=True)
class ServingConfig:
    """The model's `parameters` in config.pbtxt; the request limits' defaults are RequestLimits'."""

    model_dir: str = ""
    tiny_model_dir: str = "models/tiny"
    device: str = "auto"
    dtype: str = "auto"
    slots: int = 8
    first_chunk_frames: int = FIRST_CHUNK_FRAMES
    chunk_frames: int = CHUNK_FRAMES  # the adaptive schedule's largest chunk, or every later chunk's size
    chunk_schedule: str = "adaptive"  # or "fixed": chunk_frames a chunk after the first (pacing.py)
    cpu_threads: int = 0  # 0: half the cores for each of the serving loop's two threads
    prefill_chunk: int = 0  # prompt positions prefilled per step at most; 0: load_csm_1b's default
    compile: str = "auto"  # the frame step's pieces torch.compile'd before capture: "auto" (on CUDA), "on" or "off"
    quantize: str = "auto"  # how the linear layers run (model/quantize.py); "auto": what the staged directory holds
    kv_cache_memory_mb: int = 0  # MiB the KV caches of all slots may take; 0: no bound
    voices_dir: str = ""  # the voice library (csm_triton/triton/voices.py); "": none
    codes_cache_mb: int = 64  # MiB of context audio's Mimi codes kept (prompt.CodesCache); 0: none; CSM_CODES_CACHE_MB overrides
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # MiB of prompt prefixes' keys and values kept (prefix_pool.PrefixPool); 0: none
    turn_key: str = ""  # signs and opens turn references (TURN, CONTEXT_TURN); "": they are refused; CSM_TURN_KEY overrides
    max_waiting_requests: int = 32  # requests waiting for a slot at most; more are refused as busy
    stall_timeout_s: float = STALL_TIMEOUT_S  # a serving-loop round longer than this: the engine is hung
    max_engine_restarts: int = 3  # engine processes that may end within engine_restart_window_s
    engine_restart_window_s: float = 600.0
    engine_start_timeout_s: float = 900.0  # loading the engine longer than this fails the load
    max_text_bytes: int = RequestLimits.max_text_bytes
    max_context_segments: int = RequestLimits.max_context_segments
    max_context_text_bytes: int = RequestLimits.max_context_text_bytes
    min_context_sample_rate: int = RequestLimits.min_context_sample_rate
    max_context_sample_rate: int = RequestLimits.max_context_sample_rate
    max_request_bytes: int = RequestLimits.max_request_bytes
    max_audio_length_ms: int = RequestLimits.max_audio_length_ms

    @classmethod
    def from_parameters(cls, parameters: dict[str, dict[str, str]]) -> ServingConfig:
        """Triton gives parameters as {"key": {"string_value": "..."}}."""
        values = {key: value["string_value"] for key, value in parameters.items() if key not in BACKEND_PARAMETERS}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"config.pbtxt parameters: unknown keys {sorted(unknown)}")
        kinds = {"int": int, "float": float, "str": str}
        types = {f.name: kinds[f.type] for f in fields(cls)}
        config = cls(**{key: types[key](value) for key, value in values.items()})
        if config.slots < 1:
            raise ValueError(f"slots: must be >= 1, got {config.slots}")
        if min(config.max_waiting_requests, config.stall_timeout_s, config.engine_start_timeout_s) <= 0 or config.max_engine_restarts < 0:
            raise ValueError("config.pbtxt parameters: max_waiting_requests and the timeouts must be > 0, max_engine_restarts >= 0")
        if config.kv_cache_memory_mb < 0:
            raise ValueError(f"kv_cache_memory_mb: must be >= 0 (0: no bound), got {config.kv_cache_memory_mb}")
        for name in ("codes_cache_mb", "prefix_cache_mb"):
            if getattr(config, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0: no cache), got {getattr(config, name)}")
        RequestLimits(**config.limit_parameters())  # refuses a limit out of range, naming it
        check_chunking(config.first_chunk_frames, config.chunk_frames, config.max_audio_length_ms)
        if config.compile not in COMPILE:
            raise ValueError(f'compile: must be "auto", "on" or "off", got {config.compile!r}')
        if config.quantize != "auto" and config.quantize not in QUANTIZE_SCHEMES:
            raise ValueError(f"quantize: must be auto or one of {', '.join(QUANTIZE_SCHEMES)}, got {config.quantize!r}")
        if config.chunk_schedule not in ("adaptive", "fixed"):
            raise ValueError(f'chunk_schedule: must be "adaptive" or "fixed", got {config.chunk_schedule!r}')
        return config

    def signing_key(self) -> bytes | None:
        """The key of turn references: CSM_TURN_KEY, else the turn_key parameter; None when neither
        is set, and TURN and CONTEXT_TURN are refused. Never made up here: every replica behind one
        load balancer must hold the same key for a reference one gave to open on the next."""
        key = os.environ.get(TURN_KEY_ENV) or self.turn_key
        if not key:
            return None
        if len(key) < turns.MIN_KEY_CHARS:
            source = f" (from {TURN_KEY_ENV})" if os.environ.get(TURN_KEY_ENV) else ""
            raise ValueError(f"turn_key: must be at least {turns.MIN_KEY_CHARS} characters (openssl rand -hex 32), got {len(key)}{source}")
        if self.max_audio_length_ms // FRAME_MS > turns.MAX_FRAMES or self.max_text_bytes > turns.MAX_TEXT_BYTES:
            raise ValueError(
                f"turn_key: a turn reference holds at most {turns.MAX_FRAMES * FRAME_MS} ms of audio and {turns.MAX_TEXT_BYTES} bytes "
                f"of text, less than max_audio_length_ms {self.max_audio_length_ms} and max_text_bytes {self.max_text_bytes} allow"
            )
        return key.encode("utf-8")

    def chunk_plan(self) -> ChunkPlan:
        """How a streaming request that asks for no chunk sizes is cut."""
        return ChunkPlan(self.first_chunk_frames, self.chunk_frames, self.chunk_schedule == "adaptive")

    def limit_parameters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in RequestLimits.parameters()}

    def request_limits(self, model: ModelConfig) -> RequestLimits:
        return RequestLimits.for_model(model, **self.limit_parameters())

    def weights_dir(self, project_root: Path) -> tuple[Path, bool]:
        """(directory to load, whether it is the staged real model). Relative paths are taken
        from `project_root`."""
        staged = project_root / self.model_dir
        if self.model_dir and (staged / "config.json").exists():
            return staged, True
        return project_root / self.tiny_model_dir, False


def _check_types_and_shapes(arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        if name not in INPUTS:
            raise ValueError(f"{name}: not an input of this model; its inputs are {', '.join(INPUTS)}")
        spec = INPUTS[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{name}: expected a {spec.datatype} array, got {type(array).__name__}")
        if array.dtype != spec.dtype:
            raise ValueError(f"{name}: expected {spec.datatype} ({spec.dtype} elements), got {array.dtype}")
        if spec.is_list:
            if not (array.ndim == 1 or (array.ndim == 2 and array.shape[0] == 1)):
                raise ValueError(f"{name}: expected shape [1, n] or [n] for one request, got {list(array.shape)}")
        elif array.shape not in ((1,), (1, 1)):
            raise ValueError(f"{name}: expected one value for the request, shape [1] or [1, 1], got {list(array.shape)}")


def _byte_size(name: str, array: np.ndarray) -> int:
    """An input's bytes: for BYTES, its elements' lengths, each checked to be bytes."""
    if array.dtype != _BYTES:
        return array.nbytes
    size = 0
    for element in array.flat:
        if not isinstance(element, bytes):
            raise ValueError(f"{name}: expected BYTES elements, got {type(element).__name__}")
        size += len(element)
    return size


def _check_size(arrays: dict[str, np.ndarray], limits: RequestLimits) -> None:
    sizes = {name: _byte_size(name, array) for name, array in arrays.items()}
    total = sum(sizes.values())
    if total > limits.max_request_bytes:
        largest = max(sizes, key=sizes.__getitem__)
        raise ValueError(
            f"{largest}: the request's inputs take {total} bytes, more than max_request_bytes {limits.max_request_bytes}; "
            f"{largest} is the largest, {sizes[largest]} bytes"
        )


def _scalar(arrays: dict[str, np.ndarray], name: str, default=None):
    if name not in arrays:
        if default is None:
            raise ValueError(f"{name}: required input is missing")
        return default
    return arrays[name].reshape(-1)[0]


def _list(arrays: dict[str, np.ndarray], name: str, default: np.ndarray) -> np.ndarray:
    return arrays[name].reshape(-1) if name in arrays else default


def _text(value: bytes, label: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{label} is not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _context(arrays: dict[str, np.ndarray], limits: RequestLimits, drop_oldest: bool, turn_key: bytes | None) -> list[Segment]:
    texts = _list(arrays, "CONTEXT_TEXT", np.zeros(0, dtype=object))
    speakers = _list(arrays, "CONTEXT_SPEAKER", np.zeros(0, dtype=np.int32))
    lengths = _list(arrays, "CONTEXT_AUDIO_LENGTHS", np.zeros(len(texts), dtype=np.int32)).astype(np.int64)
    audio = _list(arrays, "CONTEXT_AUDIO", np.zeros(0, dtype=np.float32))
    if not len(texts) == len(speakers) == len(lengths):
        raise ValueError(
            f"CONTEXT_TEXT, CONTEXT_SPEAKER, CONTEXT_AUDIO_LENGTHS: one entry per context segment, "
            f"got {len(texts)}, {len(speakers)} and {len(lengths)}"
        )
    limits.check_segment_count(len(texts), TRITON_NAMES)
    if (lengths < INPUTS["CONTEXT_AUDIO_LENGTHS"].least).any():
        raise ValueError(f"CONTEXT_AUDIO_LENGTHS: sample counts must be >= {INPUTS['CONTEXT_AUDIO_LENGTHS'].least}, got {lengths.tolist()}")
    if int(lengths.sum()) != len(audio):
        raise ValueError(f"CONTEXT_AUDIO_LENGTHS: sums to {int(lengths.sum())} samples but CONTEXT_AUDIO holds {len(audio)}")
    sample_rate = int(_scalar(arrays, "CONTEXT_SAMPLE_RATE", INPUTS["CONTEXT_SAMPLE_RATE"].default))
    if len(audio):
        # A copy: the prompt is built on the serving loop's thread after execute() has returned,
        # when the request's input tensors may be gone.
        audio = np.array(mono_samples(audio, "CONTEXT_AUDIO:"))
        limits.check_sample_rate(sample_rate, TRITON_NAMES["context.sample_rate"])
    codes = _context_codes(arrays, lengths, limits, drop_oldest)
    referred = _context_turns(arrays, texts, lengths, codes, turn_key)
    segments, offset = [], 0
    for index, (text, speaker, length, turn) in enumerate(zip(texts, speakers, lengths, referred, strict=True)):
        text = _text(text, TRITON_NAMES["context.text"].format(index=index))
        if turn is not None:
            segments.append(turn)
        elif length:
            segments.append(Segment(int(speaker), text, audio[offset : offset + length], sample_rate=sample_rate))
        else:
            segments.append(Segment(int(speaker), text, codes=codes[index]))
        offset += length
    return segments


def _context_codes(
    arrays: dict[str, np.ndarray], audio_lengths: np.ndarray, limits: RequestLimits, drop_oldest: bool
) -> list[np.ndarray | None]:
    """Each context segment's codes [frames, 32] from CONTEXT_CODES (all segments' frames x 32
    values, in order) and CONTEXT_CODES_LENGTHS (frames a segment, 0 for one without), or None.
    Counted before any is read: they must fit the prompt, each alone under CONTEXT_OVERFLOW
    drop_oldest (the engine keeps those that fit), all together otherwise (their values are
    RequestLimits.check's)."""
    frames = _list(arrays, "CONTEXT_CODES_LENGTHS", np.zeros(len(audio_lengths), dtype=np.int32)).astype(np.int64)
    values = _list(arrays, "CONTEXT_CODES", np.zeros(0, dtype=np.int32))
    if len(frames) != len(audio_lengths):
        raise ValueError(f"CONTEXT_CODES_LENGTHS: one entry per context segment ({len(audio_lengths)}), got {len(frames)}")
    if (frames < INPUTS["CONTEXT_CODES_LENGTHS"].least).any():
        raise ValueError(f"CONTEXT_CODES_LENGTHS: frame counts must be >= {INPUTS['CONTEXT_CODES_LENGTHS'].least}, got {frames.tolist()}")
    both = np.flatnonzero((frames > 0) & (audio_lengths > 0))
    if len(both):
        raise ValueError(
            f"CONTEXT_CODES_LENGTHS: segment {int(both[0])} has both codes and audio (CONTEXT_AUDIO_LENGTHS); a segment holds one of them"
        )
    # Each segment's codes take a prompt position a frame and one more: more than fit are refused
    # before the values are sliced or copied.
    counted = frames.max(initial=0, keepdims=True) if drop_oldest else frames
    positions = int((counted + (counted > 0)).sum())
    if positions > limits.max_prompt_positions:
        raise ValueError(
            f"CONTEXT_CODES_LENGTHS: {int(counted.sum())} frames of context codes take {positions} prompt positions, more than "
            f"the {limits.max_prompt_positions} that fit the model's {limits.max_positions}"
        )
    width = limits.audio_num_codebooks
    if int(frames.sum()) * width != len(values):
        raise ValueError(
            f"CONTEXT_CODES_LENGTHS: sums to {int(frames.sum())} frames ({int(frames.sum()) * width} codes of {width} codebooks) "
            f"but CONTEXT_CODES holds {len(values)}"
        )
    # A copy, as for the audio: the prompt may be built after execute() has returned.
    values = np.array(values).reshape(-1, width)
    ends = np.cumsum(frames)
    return [values[end - count : end] if count else None for count, end in zip(frames.tolist(), ends.tolist(), strict=True)]


def _context_turns(
    arrays: dict[str, np.ndarray], texts: np.ndarray, audio_lengths: np.ndarray, codes: list[np.ndarray | None], key: bytes | None
) -> list[Segment | None]:
    """Each context segment given by reference (CONTEXT_TURN; b"" for one that is not) as the turn
    it names, opened with the turn key and cut to CONTEXT_PLAYED_MS (-1: whole), or None. The
    reference carries the turn's text, speaker and codes, so its segment sends none of them; its
    length is bounded and its signature checked before its payload is read (turns.open_turn)."""
    segments = len(texts)
    references = _list(arrays, "CONTEXT_TURN", np.full(segments, b"", dtype=object))
    played = _list(arrays, "CONTEXT_PLAYED_MS", np.full(segments, -1, dtype=np.int32)).astype(np.int64)
    if "CONTEXT_TURN" in arrays and key is None:
        raise ValueError(_no_turn_key("CONTEXT_TURN"))
    for name, values in (("CONTEXT_TURN", references), ("CONTEXT_PLAYED_MS", played)):
        if len(values) != segments:
            raise ValueError(f"{name}: one entry per context segment ({segments}), got {len(values)}")
    least = INPUTS["CONTEXT_PLAYED_MS"].least
    if (played < least).any():
        raise ValueError(f"CONTEXT_PLAYED_MS: milliseconds must be >= 0, or {least} for a whole turn, got {played.tolist()}")
    for index, reference in enumerate(references):
        if reference and (texts[index] or audio_lengths[index] or codes[index] is not None):
            raise ValueError(
                f"CONTEXT_TURN: segment {index} is a turn by reference, which carries its own text, speaker and codes: "
                "its CONTEXT_TEXT entry must be empty and it takes no audio or codes"
            )
        if not reference and played[index] >= 0:
            raise ValueError(f"CONTEXT_PLAYED_MS: segment {index} is no turn by reference (CONTEXT_TURN), whose playing it counts; send -1")
    opened: list[Segment | None] = []
    for index, (reference, played_ms) in enumerate(zip(references, played.tolist(), strict=True)):
        if not reference:
            opened.append(None)
            continue
        try:
            turn = turns.open_turn(key, reference.decode("utf-8", "replace"))
        except ValueError as error:
            raise ValueError(f"CONTEXT_TURN: segment {index}: {error}") from None
        if played_ms >= 0:
            turn = turn.played(played_ms)
        opened.append(turn.segment())
    return opened


def _no_turn_key(name: str) -> str:
    return (
        f"{name}: turn references are off on this server: set csm_stream's turn_key parameter or {TURN_KEY_ENV} "
        f"(at least {turns.MIN_KEY_CHARS} characters, the same on every replica)"
    )


class TurnOutput:
    """A stream's TURN: its chunks' codes gathered as they go out, and once it has completed the
    reference of its turn (the request's text and speaker, every frame generated). A stream that is
    cancelled or fails never asks for it: it has no turn."""

    def __init__(self, key: bytes, request: GenerationRequest) -> None:
        self._key, self._text, self._speaker = key, request.text, request.speaker
        self._codes: list[np.ndarray] = [np.zeros((0, AUDIO_NUM_CODEBOOKS), np.int32)]  # each chunk's [frames, 32]

    def add(self, codes: np.ndarray) -> None:
        self._codes.append(codes)

    def tensor(self) -> np.ndarray:
        """TURN as the final response carries it: [1, 1] BYTES."""
        reference = turns.sign_turn(self._key, self._text, self._speaker, np.concatenate(self._codes))
        return np.array([[reference.encode("ascii")]], dtype=object)


def turn_output(wanted: Collection[str], outputs: Collection[str], request: GenerationRequest, key: bytes | None) -> TurnOutput | None:
    """The request's TURN, when it is to have one: asked for by name, or with every one of the
    model's `outputs` (what Triton asks for on behalf of a request that names none) on a server with
    a turn key. Asked for by name from a server without a key, it is refused; a request that names
    no output gets all the rest, as before there were turn references."""
    if "TURN" not in wanted:
        return None
    if key is None:
        if set(outputs) <= set(wanted):
            return None
        raise ValueError(_no_turn_key("TURN"))
    return TurnOutput(key, request)


def read_request(
    arrays: dict[str, np.ndarray], limits: RequestLimits, voices: Collection[str] = (), turn_key: bytes | None = None
) -> GenerationRequest:
    """One Triton request's input arrays (`as_numpy()` of each input given) -> a GenerationRequest
    within `limits`, checked here once and trusted by the engine process. Nothing costly is done on
    a request before it is known to be within them. VOICE names one of `voices` (the voice
    library's names; the engine process holds their codes and puts the clip first in the context).
    CONTEXT_TURN's references open with `turn_key` (ServingConfig.signing_key; None: refused)."""
    _check_types_and_shapes(arrays)
    _check_size(arrays, limits)
    default_ms = min(GenerationRequest.max_audio_length_ms, limits.max_audio_length_ms)
    overflow = GenerationRequest.context_overflow
    if "CONTEXT_OVERFLOW" in arrays:
        overflow = _text(_scalar(arrays, "CONTEXT_OVERFLOW"), "CONTEXT_OVERFLOW:")
    request = GenerationRequest(
        text=_text(_scalar(arrays, "TEXT"), "TEXT:"),
        speaker=int(_scalar(arrays, "SPEAKER")),
        context=_context(arrays, limits, overflow == "drop_oldest", turn_key),
        temperature=float(_scalar(arrays, "TEMPERATURE", GenerationRequest.temperature)),
        topk=int(_scalar(arrays, "TOPK", GenerationRequest.topk)),
        max_audio_length_ms=int(_scalar(arrays, "MAX_AUDIO_LENGTH_MS", default_ms)),
        seed=int(_scalar(arrays, "SEED")) if "SEED" in arrays else None,
        context_overflow=overflow,
        context_pinned=int(_scalar(arrays, "CONTEXT_PINNED", GenerationRequest.context_pinned)),
    )
    limits.check(request, TRITON_NAMES)
    if "VOICE" in arrays:
        request.voice = _voice(_text(_scalar(arrays, "VOICE"), "VOICE:"), voices, limits, len(request.context))
    return request


def _voice(name: str, voices: Collection[str], limits: RequestLimits, segments: int) -> str:
    if name not in voices:
        known = ", ".join(sorted(voices)[:20]) if voices else "none: this server's voices_dir parameter names no voice library"
        raise ValueError(f"VOICE: no voice {name[:80]!r} in the voice library; its voices: {known}")
    if segments + 1 > limits.max_context_segments:
        raise ValueError(f"VOICE: its clip and {segments} context segments exceed max_context_segments {limits.max_context_segments}")
    return name


def read_chunking(arrays: dict[str, np.ndarray], config: ServingConfig) -> ChunkPlan:
    """How a streaming request is cut into chunks: the sizes it sends, the config's for the rest."""
    _check_types_and_shapes({name: arrays[name] for name in ("FIRST_CHUNK_FRAMES", "CHUNK_FRAMES") if name in arrays})
    sizes = {name: int(_scalar(arrays, name)) if name in arrays else None for name in STREAM_INPUTS}
    plan = chunk_plan(sizes["FIRST_CHUNK_FRAMES"], sizes["CHUNK_FRAMES"], config.chunk_plan())
    check_chunking(plan.first_frames, plan.max_frames, config.max_audio_length_ms, TRITON_NAMES)
    return plan
