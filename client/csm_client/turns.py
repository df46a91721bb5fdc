"""Turn references: one turn of a conversation (its text, its speaker and the Mimi codes generated
for it) as a signed, self-contained string, which a client sends back in a later request's context
in place of the turn's audio or codes, so that it sends only its new line.

A reference carries what it names, so any replica that holds the key opens it, with no store
shared between them: `csm1.<payload>.<signature>`, the payload base64url (unpadded) of the zlib of
a header (speaker, text bytes, frames), the UTF-8 text and the codes as int16, and the signature
base64url of the HMAC-SHA256 of `csm1.<payload>`. Opening checks the signature first (in constant
time), then inflates at most the largest legal turn's bytes, then checks every field, so that a
forged, altered or oversized reference costs a hash and is refused. Numpy and the standard library only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .contract import AUDIO_NUM_CODEBOOKS, AUDIO_VOCAB_SIZE, FRAME_MS, INT32_MAX, MAX_AUDIO_LENGTH_MS, MAX_TEXT_BYTES
from .segment import Segment

VERSION = "csm1"
MIN_KEY_CHARS = 32  # a signing key's least length: `openssl rand -hex 32` gives 64
HEADER = struct.Struct("<IIH")  # speaker, UTF-8 bytes of the text, frames
CODE = np.dtype("<i2")  # codes are below AUDIO_VOCAB_SIZE (2051): 16 bits hold them
MAX_FRAMES = MAX_AUDIO_LENGTH_MS // FRAME_MS  # the longest turn csm_stream generates
MAX_PAYLOAD = HEADER.size + MAX_TEXT_BYTES + MAX_FRAMES * AUDIO_NUM_CODEBOOKS * CODE.itemsize
# zlib's compressBound: what the largest payload takes at most when it does not compress.
MAX_COMPRESSED = MAX_PAYLOAD + (MAX_PAYLOAD >> 12) + (MAX_PAYLOAD >> 14) + (MAX_PAYLOAD >> 25) + 13
SIGNATURE_CHARS = 43  # 32 bytes of HMAC-SHA256, base64url unpadded
MAX_REFERENCE_CHARS = len(VERSION) + 1 + (4 * MAX_COMPRESSED + 2) // 3 + 1 + SIGNATURE_CHARS
REFERENCE = re.compile(rf"({re.escape(VERSION)}\.[A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{{{SIGNATURE_CHARS}}})")


@dataclass(frozen=True)
class TurnRecord:
    """What a reference names: the turn's text, its speaker and its codes (int32 [frames, 32],
    frames of 80 ms; none for a turn that made no audio)."""

    text: str
    speaker: int
    codes: np.ndarray

    def played(self, played_ms: int) -> TurnRecord:
        """The turn as far as it was heard: its first floor(played_ms / 80) frames; the text is kept
        whole (which words were heard is not known)."""
        if played_ms < 0:
            raise ValueError(f"played_ms must be >= 0, got {played_ms}")
        return TurnRecord(self.text, self.speaker, self.codes[: played_ms // FRAME_MS])

    def segment(self) -> Segment:
        """The turn as a context segment: its codes as they were generated, never encoded again,
        or its text alone when no frame of it was played."""
        return Segment(speaker=self.speaker, text=self.text, codes=self.codes if len(self.codes) else None)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, signed: str) -> bytes:
    if not isinstance(key, bytes) or not key:
        raise ValueError("the turn key must be non-empty bytes")
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def sign_turn(key: bytes, text: str, speaker: int, codes: np.ndarray) -> str:
    """The reference of a turn: `text` spoken as `speaker`, as the Mimi `codes` ([frames, 32]
    integers below AUDIO_VOCAB_SIZE, at most MAX_FRAMES of them) generated for it."""
    if not isinstance(text, str):
        raise ValueError(f"text: must be a string, got {type(text).__name__}")
    data = text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"text: {len(data)} bytes of UTF-8, more than {MAX_TEXT_BYTES}")
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or not 0 <= speaker <= INT32_MAX:
        raise ValueError(f"speaker: must be an integer in [0, {INT32_MAX}], got {speaker!r}")
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != AUDIO_NUM_CODEBOOKS or len(codes) > MAX_FRAMES:
        raise ValueError(f"codes: must be [frames, {AUDIO_NUM_CODEBOOKS}] with at most {MAX_FRAMES} frames, got {list(codes.shape)}")
    if codes.size and (not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= AUDIO_VOCAB_SIZE):
        raise ValueError(f"codes: must be integers in [0, {AUDIO_VOCAB_SIZE - 1}]")
    payload = HEADER.pack(int(speaker), len(data), len(codes)) + data + codes.astype(CODE).tobytes()
    signed = f"{VERSION}.{_b64encode(zlib.compress(payload, 9))}"
    return f"{signed}.{_b64encode(_signature(key, signed))}"


def open_turn(key: bytes, reference: str) -> TurnRecord:
    """The turn a reference names, once its signature under `key` holds; ValueError saying why
    not: not a reference, too long, a signature that does not match (forged, altered, truncated or
    signed with another key), or a signed payload that holds no turn."""
    if not isinstance(reference, str) or not reference.startswith(VERSION + "."):
        raise ValueError(f"is not a turn reference (one starts with {VERSION + '.'!r})")
    if len(reference) > MAX_REFERENCE_CHARS:
        raise ValueError(f"is {len(reference)} characters, longer than any turn reference ({MAX_REFERENCE_CHARS})")
    parts = REFERENCE.fullmatch(reference)
    if parts is None:
        raise ValueError(f"is no turn reference: {VERSION}.<payload>.<signature>, each base64url")
    signed, signature = parts.groups()
    if not hmac.compare_digest(signature, _b64encode(_signature(key, signed))):
        raise ValueError("its signature does not match: it was altered, cut short, or signed with another key")
    try:
        return _record(_inflate(_b64decode(signed[len(VERSION) + 1 :])))
    except (binascii.Error, zlib.error, UnicodeDecodeError) as error:
        raise ValueError(f"holds no turn: {error}") from error


def _inflate(compressed: bytes) -> bytes:
    """The payload, never more than MAX_PAYLOAD bytes of it: a zlib bomb stops there."""
    inflater = zlib.decompressobj()
    payload = inflater.decompress(compressed, MAX_PAYLOAD + 1)
    if len(payload) > MAX_PAYLOAD or inflater.unconsumed_tail:
        raise ValueError(f"holds no turn: its payload is larger than any turn's ({MAX_PAYLOAD} bytes)")
    if not inflater.eof or inflater.unused_data:
        raise ValueError("holds no turn: its payload is not one whole zlib stream")
    return payload


def _record(payload: bytes) -> TurnRecord:
    if len(payload) < HEADER.size:
        raise ValueError(f"holds no turn: {len(payload)} bytes, shorter than its header")
    speaker, text_bytes, frames = HEADER.unpack_from(payload)
    code_bytes = frames * AUDIO_NUM_CODEBOOKS * CODE.itemsize
    if speaker > INT32_MAX or text_bytes > MAX_TEXT_BYTES or frames > MAX_FRAMES or len(payload) != HEADER.size + text_bytes + code_bytes:
        raise ValueError(f"holds no turn: speaker {speaker}, {text_bytes} text bytes, {frames} frames in {len(payload)} bytes")
    text = payload[HEADER.size : HEADER.size + text_bytes].decode("utf-8")
    codes = np.frombuffer(payload, CODE, offset=HEADER.size + text_bytes).reshape(frames, AUDIO_NUM_CODEBOOKS).astype(np.int32)
    if codes.size and (codes.min() < 0 or codes.max() >= AUDIO_VOCAB_SIZE):
        raise ValueError(f"holds no turn: codes outside [0, {AUDIO_VOCAB_SIZE - 1}]")
    return TurnRecord(text, speaker, codes)
