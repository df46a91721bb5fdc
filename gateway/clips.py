"""Decoding the clips callers send (context turns' audio, custom voices' samples) with bounds that
hold whatever a file declares.

ffmpeg, left to probe, picks among all its demuxers, some of which open other files (concat
scripts, HLS playlists, image sequences) relative to the process's working directory. So a clip
is recognised here by its first bytes as one of an allow-list of containers and opened with that
demuxer alone; nested opens are refused too (a protocol whitelist naming none) and the mov demuxer's
external data references stay off. A clip's sample rate and channels are read from its header and
checked before any sample is decoded, then each decoded frame is checked as it comes (a stream may
change its rate) and counted at the input rate, so decoding stops at the bound: the samples kept
are at most `max_seconds` at `max_rate`, mono float32, however long or fast the file says it is.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import av
import numpy as np

from csm_client.contract import check_sample_rate

from .config import GatewayConfig

# The containers accepted, as their ffmpeg demuxers name them.
ALLOWED = "WAV, FLAC, MP3, Ogg (Opus, Vorbis, FLAC), AAC (ADTS), MP4/M4A, WebM/Matroska"
# Demuxer options: no nested open of any protocol ("none" matches none), and for mov, none of its
# data references to other files (both ffmpeg's defaults today, stated so that they stay off).
DEMUXER_OPTIONS = {"protocol_whitelist": "none", "enable_drefs": "0", "use_absolute_path": "0"}


class AudioInputError(ValueError):
    """A clip that cannot be used; the message says why."""


@dataclass(frozen=True)
class ClipBounds:
    """What a decoded clip may be: csm_stream's context sample rates (its min/max_context_sample_rate,
    and a rate whose resampling filter it refuses is refused here too) and channels at most."""

    min_rate: int
    max_rate: int
    max_channels: int

    @classmethod
    def from_config(cls, config: GatewayConfig) -> ClipBounds:
        return cls(config.min_clip_sample_rate, config.max_clip_sample_rate, config.max_clip_channels)

    def check_stream(self, rate: int, channels: int) -> None:
        try:
            check_sample_rate(rate, self.min_rate, self.max_rate, "sample rate")
        except ValueError as error:
            raise AudioInputError(str(error)) from None
        if not 1 <= channels <= self.max_channels:
            raise AudioInputError(f"has {channels} channels; 1 to {self.max_channels} are accepted")

    def max_bytes(self, seconds: float) -> int:
        """Bytes of the samples that decoding `seconds` may keep at most (mono float32 at max_rate)."""
        return int(seconds * self.max_rate) * 4


def demuxer_of(data: bytes) -> str | None:
    """The ffmpeg demuxer of an allowed container, recognised by its first bytes; None for any other."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: WebM and Matroska
        return "matroska"
    if data[4:8] == b"ftyp":  # ISO base media: MP4, M4A
        return "mov"
    if data[:3] == b"ID3":  # an ID3v2 tag before MPEG audio frames
        return "mp3"
    if len(data) >= 2 and data[0] == 0xFF:
        if data[1] & 0xF6 == 0xF0:  # ADTS: 12 sync bits, then layer 0
            return "aac"
        if data[1] & 0xE0 == 0xE0 and data[1] & 0x06:  # an MPEG audio frame: 11 sync bits, layer 1 to 3
            return "mp3"
    return None


def decode_audio(data: bytes, max_seconds: float, bounds: ClipBounds) -> tuple[np.ndarray, int]:
    """A clip of an allowed container -> (mono float32 samples, its sample rate), refused past
    `max_seconds` or out of `bounds`. Channels are averaged, as the model's encoder expects mono."""
    demuxer = demuxer_of(data)
    if demuxer is None:
        raise AudioInputError(f"is not audio of a format accepted: {ALLOWED}")
    try:
        with av.open(io.BytesIO(data), "r", format=demuxer, container_options=DEMUXER_OPTIONS) as container:
            if not container.streams.audio:
                raise AudioInputError("holds no audio stream")
            stream = container.streams.audio[0]
            rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
            bounds.check_stream(rate, channels)
            limit = int(max_seconds * rate)
            # Written in place: pages are only committed as samples arrive, so the memory held is
            # the clip's, never the bound's.
            samples, count = np.empty(limit, np.float32), 0
            mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                if (frame.sample_rate, frame.layout.nb_channels) != (rate, channels):
                    raise AudioInputError(f"changes its sample rate or channels mid-stream (from {rate} Hz, {channels} channels)")
                if count + frame.samples > limit:
                    raise AudioInputError(f"is longer than {max_seconds:g} s")
                for converted in mono.resample(frame):
                    count = _append(samples, count, converted)
            for converted in mono.resample(None):
                count = _append(samples, count, converted)
    except av.FFmpegError as error:
        raise AudioInputError(f"cannot be decoded as {demuxer}: {error}") from error
    if not count:
        raise AudioInputError("holds no samples")
    return samples[:count], rate


def _append(samples: np.ndarray, count: int, frame: av.AudioFrame) -> int:
    part = frame.to_ndarray().reshape(-1)[: len(samples) - count]  # the resampler's flush may round up by a sample
    samples[count : count + len(part)] = part
    return count + len(part)


def decode_base64_audio(text: str, max_seconds: float, bounds: ClipBounds) -> tuple[np.ndarray, int]:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise AudioInputError("is not valid base64") from error
    return decode_audio(data, max_seconds, bounds)


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """ffmpeg's resampler (swr), for context clips whose rates differ: Triton takes one rate per request."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=new_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    out = [f.to_ndarray().reshape(-1) for f in (*resampler.resample(frame), *resampler.resample(None))]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
