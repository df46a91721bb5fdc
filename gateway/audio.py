"""The gateway's audio out, without torch: streaming encoders for each `response_format` (WAV
with a streaming header, raw PCM, and mp3 / opus / aac / flac through PyAV's ffmpeg) and the
`speed` change (ffmpeg's atempo, which keeps the pitch). Clips coming in are gateway/clips.py's.

Every encoder takes float32 mono chunks at 24 kHz as they are generated and returns the bytes
ready to send for each, so a response's first bytes leave with the first chunk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import av
import numpy as np

from csm_client.contract import SAMPLE_RATE

# WAV's size fields for a stream whose length is not known yet: players and decoders (ffmpeg,
# browsers, libsndfile) read such a file to its end.
UNKNOWN_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class Format:
    """One `response_format`: its MIME type, and the ffmpeg muxer and encoder for the compressed ones."""

    media_type: str
    muxer: str | None = None
    codec: str | None = None
    options: tuple[tuple[str, str], ...] = ()


FORMATS = {
    "mp3": Format("audio/mpeg", "mp3", "libmp3lame"),
    # Ogg pages are flushed every 20 ms of audio rather than every second, so that opus streams too.
    "opus": Format("audio/ogg", "ogg", "libopus", (("page_duration", "20000"),)),
    "aac": Format("audio/aac", "adts", "aac"),
    "flac": Format("audio/flac", "flac", "flac"),
    "wav": Format("audio/wav"),
    "pcm": Format("audio/pcm"),
}


def pcm16(samples: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] -> 16-bit little-endian PCM (clipped, rounded)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int = SAMPLE_RATE, data_bytes: int | None = None) -> bytes:
    """A 44-byte RIFF/WAVE header for 16-bit mono PCM; `data_bytes` None: a stream of unknown length."""
    data = UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff = UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
        + b"data"
        + struct.pack("<I", data)
    )


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A whole 16-bit mono WAV file with exact sizes."""
    data = pcm16(samples)
    return wav_header(sample_rate, len(data)) + data


class _Sink:
    """A write-only file for PyAV's muxer: the bytes written since the last `take`. Having no
    `seek`, it makes the muxers write a streamable file (flac leaves its header's totals unset)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class Encoder:
    """Streams one response: `feed(chunk)` -> the bytes to send now, `finish()` -> the last ones."""

    def __init__(self, response_format: str) -> None:
        self.format = FORMATS[response_format]
        self._header = response_format == "wav"
        self._container = None
        if self.format.muxer is not None:
            self._sink = _Sink()
            self._container = av.open(
                self._sink, "w", format=self.format.muxer, options={"flush_packets": "1"}, container_options=dict(self.format.options)
            )
            self._stream = self._container.add_stream(self.format.codec, rate=SAMPLE_RATE, layout="mono")
            self._pts = 0

    def feed(self, samples: np.ndarray) -> bytes:
        if self._container is None:
            header, self._header = (wav_header() if self._header else b""), False
            return header + pcm16(samples)
        if not len(samples):  # the speed change holds back its first chunks; encoders refuse empty frames
            return b""
        # 16-bit samples, quantised as pcm16 does, so that flac's decoded samples are pcm's and wav's.
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm16(samples), "<i2")[None], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        self._pts += len(samples)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        if self._container is None:
            return wav_header() if self._header else b""  # a stream that produced no audio is still a valid (empty) WAV
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()

    def close(self) -> None:
        """Releases the muxer of a response that ends early (a client gone, an error)."""
        if self._container is not None:
            try:
                self._container.close()
            except (av.FFmpegError, ValueError):
                pass  # already closed, or closed before any frame: nothing to release


def atempo_chain(speed: float) -> list[float]:
    """ffmpeg's atempo takes factors in [0.5, 100]: slower speeds are chained halvings."""
    factors = []
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    return [*factors, speed]


class SpeedChange:
    """Changes the tempo of a stream of chunks, keeping its pitch (ffmpeg's atempo, WSOLA), chunk by
    chunk. The whole comes out `speed` times shorter to the sample: atempo ends up to a window (~50
    ms) off, so its tail is cut or padded with silence to round(samples in / speed)."""

    def __init__(self, speed: float) -> None:
        self._speed = speed
        self._sent = 0
        self._graph = av.filter.Graph()
        source = self._graph.add_abuffer(format="flt", sample_rate=SAMPLE_RATE, layout="mono", time_base=f"1/{SAMPLE_RATE}")
        node = source
        for factor in atempo_chain(speed):
            following = self._graph.add("atempo", f"{factor:.6f}")
            node.link_to(following)
            node = following
        sink = self._graph.add("abuffersink")
        node.link_to(sink)
        self._graph.configure()
        self._pts = 0

    def _drain(self) -> np.ndarray:
        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1))
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray) -> np.ndarray:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        self._pts += len(samples)
        self._graph.push(frame)
        out = self._drain()
        self._sent += len(out)
        return out

    def finish(self) -> np.ndarray:
        self._graph.push(None)
        tail = self._drain()
        missing = max(0, round(self._pts / self._speed) - self._sent)
        return np.pad(tail[:missing], (0, max(0, missing - len(tail))))
