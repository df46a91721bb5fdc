"""Request tensors for raw tritonclient calls in the tests (arrays with the batch dimension first),
and what streamed chunks may look like."""

from __future__ import annotations

import numpy as np
from tritonclient.utils import np_to_triton_dtype


def tensors(module, arrays: dict[str, np.ndarray]) -> list:
    inputs = []
    for name, array in arrays.items():
        infer_input = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def request(text: bytes | str = "Hello from Sesame.", speaker: int = 0, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """A request's arrays, batch dimension first; `extra` adds or (as None) drops inputs."""
    arrays = {
        "TEXT": np.array([[text.encode() if isinstance(text, str) else text]], dtype=object),
        "SPEAKER": np.array([[speaker]], dtype=np.int32),
        "MAX_AUDIO_LENGTH_MS": np.array([[400]], dtype=np.int32),
        "SEED": np.array([[3]], dtype=np.int64),
    }
    arrays.update(extra)
    return {name: array for name, array in arrays.items() if array is not None}


# A prompt longer than the model's 2048 positions (~2400), each text within its 4096-byte limit.
LONG_TEXTS = ["word " * 800] * 3


def long_prompt(**extra: np.ndarray) -> dict[str, np.ndarray]:
    """A request whose prompt does not fit the model: `LONG_TEXTS`, two as context."""
    context = {"CONTEXT_TEXT": vector([text.encode() for text in LONG_TEXTS[1:]], object), "CONTEXT_SPEAKER": vector([1, 0], np.int32)}
    return request(LONG_TEXTS[0], 0, **context | extra)


def scalar(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def vector(values, dtype) -> np.ndarray:
    return np.array([values], dtype=dtype)


def chunk_sizes(frames: int, first_chunk_frames: int, chunk_frames: int) -> list[int]:
    """The frames of each chunk a stream of `frames` frames is cut into."""
    sizes = [min(frames, first_chunk_frames)]
    while sum(sizes) < frames:
        sizes.append(min(chunk_frames, frames - sum(sizes)))
    return sizes
