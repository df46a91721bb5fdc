"""The contract between CSM's Triton models and their callers, defined once: the audio's facts, the
request inputs (name, Triton type, shape, default, least value) and outputs, the integer bounds
of their tensors, and csm_stream's default chunking and request limits.

It lives in the light client's distribution (numpy only), so that the client and the gateway need
no server package and no torch; the server (csm_triton) imports it from here. tests/test_contract.py
checks the model repository's config.pbtxt files and the gateway's field names against it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

SAMPLE_RATE = 24_000  # Mimi's rate: the audio generated, and the rate context audio is resampled to
SAMPLES_PER_FRAME = 1920  # one Mimi frame at 12.5 Hz
FRAME_MS = 80
AUDIO_NUM_CODEBOOKS = 32  # the codes of one frame
AUDIO_VOCAB_SIZE = 2051  # CSM-1B's codes are below it: TOPK's upper bound
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FP32_MAX = float(np.finfo(np.float32).max)

# Default chunking of a stream: a short first chunk for a fast first audio, then about a second of
# audio per chunk, which keeps the decoder's per-call cost small against the audio it makes.
FIRST_CHUNK_FRAMES = 2
CHUNK_FRAMES = 12

# csm_stream's request limits by default (its config.pbtxt parameters of these names, lower-cased).
MAX_TEXT_BYTES = 4096  # UTF-8 bytes of TEXT
MAX_CONTEXT_SEGMENTS = 32
MAX_CONTEXT_TEXT_BYTES = 4096  # UTF-8 bytes of each context segment's text
MIN_CONTEXT_SAMPLE_RATE = 8000
MAX_CONTEXT_SAMPLE_RATE = 48_000
# All inputs of one request together; 32 MiB admits the longest context audio that fits the prompt
# at 48 kHz (2045 frames: 7.85M samples, 30 MiB of FP32).
MAX_REQUEST_BYTES = 32 << 20
MAX_AUDIO_LENGTH_MS = 30_000  # MAX_AUDIO_LENGTH_MS's upper bound

STANDARD_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

# CONTEXT_OVERFLOW's values: what the server does with a context whose prompt does not fit the model.
# "refuse": an INVALID_ARG; "drop_oldest": the oldest segments, but for the pinned ones, are left out until it fits.
CONTEXT_OVERFLOW_MODES = ("refuse", "drop_oldest")

MAX_RESAMPLING_FILTER = 1_000_000
"""Elements of torchaudio's resampling filter that a context sample rate may need.

torchaudio builds its sinc filter from the two rates reduced by their gcd, [new/g, 2*width + orig/g],
and holds about five float32 copies of it while building it. Measured (torchaudio 2.9.1, 1 s of
audio, peak RSS): 8235 Hz, 0.9M elements, +17 MiB; 9496 Hz, 3.6M, +69 MiB; 9548 Hz, 14.4M, +234
MiB and 0.35 s; 12007 Hz would need 289M elements (~6 GB, seen taking 10 s). Every standard rate
needs at most 51,520 (11025 Hz), which resamples in ~1 ms a second of audio. The rest of the cost
grows with the audio, which the prompt bounds: the longest context audio at 48 kHz (163.6 s) takes
+265 MiB and 0.16 s."""


class Tensor(NamedTuple):
    """One input or output of the csm, csm_stream and text_stream_tts models."""

    datatype: str  # Triton's
    dtype: np.dtype  # numpy's, as `as_numpy()` gives it
    dims: tuple[int, ...]  # config.pbtxt's, after the batch dimension: (1,) one value, (-1,) one entry a segment, sample or code
    required: bool = False
    default: Any = None  # the server's value when an optional input is absent; None: it has none
    least: int | None = None  # the smallest value the server accepts, where it checks one

    @property
    def is_list(self) -> bool:
        """A request sends it as [1, n] or [n]; else as one value, [1] or [1, 1]."""
        return self.dims[0] == -1

    @property
    def most(self) -> int | float:
        """The largest value its type holds: the bound on a number that has no other, so that none wraps."""
        return {"INT32": INT32_MAX, "INT64": INT64_MAX, "FP32": FP32_MAX}[self.datatype]


_BYTES, _INT32, _FP32, _INT64 = np.dtype(object), np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.int64)
_ONE, _LIST = (1,), (-1,)

INPUTS: dict[str, Tensor] = {
    "TEXT": Tensor("BYTES", _BYTES, _ONE, required=True),
    "SPEAKER": Tensor("INT32", _INT32, _ONE, required=True, least=0),
    "CONTEXT_TEXT": Tensor("BYTES", _BYTES, _LIST),
    "CONTEXT_SPEAKER": Tensor("INT32", _INT32, _LIST, least=0),
    "CONTEXT_AUDIO": Tensor("FP32", _FP32, _LIST),
    "CONTEXT_AUDIO_LENGTHS": Tensor("INT32", _INT32, _LIST, least=0),
    "CONTEXT_SAMPLE_RATE": Tensor("INT32", _INT32, _ONE, default=SAMPLE_RATE),  # within csm_stream's min/max_context_sample_rate
    "CONTEXT_CODES": Tensor("INT32", _INT32, _LIST, least=0),
    "CONTEXT_CODES_LENGTHS": Tensor("INT32", _INT32, _LIST, least=0),
    "TEMPERATURE": Tensor("FP32", _FP32, _ONE, default=0.9),  # finite and > 0
    "TOPK": Tensor("INT32", _INT32, _ONE, default=50, least=1),
    "MAX_AUDIO_LENGTH_MS": Tensor("INT32", _INT32, _ONE, default=10_000, least=FRAME_MS),
    "SEED": Tensor("INT64", _INT64, _ONE),  # absent: a random seed
    "FIRST_CHUNK_FRAMES": Tensor("INT32", _INT32, _ONE, default=FIRST_CHUNK_FRAMES, least=1),
    "CHUNK_FRAMES": Tensor("INT32", _INT32, _ONE, default=CHUNK_FRAMES, least=1),  # absent: adaptive, up to CHUNK_FRAMES
    "VOICE": Tensor("BYTES", _BYTES, _ONE),
    "CONTEXT_OVERFLOW": Tensor("BYTES", _BYTES, _ONE, default=CONTEXT_OVERFLOW_MODES[0]),  # one of CONTEXT_OVERFLOW_MODES
    "CONTEXT_PINNED": Tensor("INT32", _INT32, _ONE, default=0, least=0),  # at most the context's segments
    # Each segment's turn by reference (csm_client.turns; b"" for one sent as text, audio or codes),
    # which csm_stream opens with its turn_key, and how much of that turn was played (-1: all of it).
    "CONTEXT_TURN": Tensor("BYTES", _BYTES, _LIST),
    "CONTEXT_PLAYED_MS": Tensor("INT32", _INT32, _LIST, default=-1, least=-1),
}
# Inputs of the streaming models only (csm_stream, text_stream_tts): the unary csm model has no chunks.
STREAM_INPUTS = ("FIRST_CHUNK_FRAMES", "CHUNK_FRAMES")

OUTPUTS: dict[str, Tensor] = {
    "AUDIO": Tensor("FP32", _FP32, _LIST),  # 24 kHz mono samples
    "AUDIO_CODES": Tensor("INT32", _INT32, (-1, AUDIO_NUM_CODEBOOKS)),  # [frames, 32]
    "CONTEXT_DROPPED": Tensor("INT32", _INT32, _ONE),  # on a stream's first response: the context segments dropped
    "TURN": Tensor("BYTES", _BYTES, _ONE),  # on a completed stream's final response: the turn's reference (csm_client.turns)
}


def check_range(value: int, low: int, high: int, label: str, unit: str = "") -> None:
    if not low <= value <= high:
        raise ValueError(f"{label} must be in [{low}, {high}]{unit}, got {value}")


def resampling_filter_elements(sample_rate: int) -> int:
    """Elements of the filter torchaudio builds to resample `sample_rate` to 24 kHz (its
    `_get_sinc_resample_kernel`: lowpass_filter_width 6, rolloff 0.99)."""
    gcd = math.gcd(sample_rate, SAMPLE_RATE)
    orig, new = sample_rate // gcd, SAMPLE_RATE // gcd
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    return new * (2 * width + orig)


def check_sample_rate(sample_rate: int, low: int, high: int, label: str) -> None:
    """A context sample rate in [low, high] Hz whose resampling to 24 kHz costs little: the server's
    check, which the gateway applies to a clip before decoding it."""
    check_range(sample_rate, low, high, label, " Hz")
    elements = resampling_filter_elements(sample_rate)
    if elements > MAX_RESAMPLING_FILTER:
        gcd = math.gcd(sample_rate, SAMPLE_RATE)
        nearest = min(STANDARD_SAMPLE_RATES, key=lambda rate: abs(rate - sample_rate))
        raise ValueError(
            f"{label} {sample_rate} Hz is {sample_rate // gcd}:{SAMPLE_RATE // gcd} to Mimi's {SAMPLE_RATE} Hz, "
            f"whose resampling filter would take {elements:,} elements (at most {MAX_RESAMPLING_FILTER:,}: memory and time "
            f"grow with it); resample the audio to a standard rate such as {nearest} Hz first"
        )
