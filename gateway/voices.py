"""The gateway's voices: the configured ones (OpenAI's names and a voices file, gateway/config.py)
and custom voices created through `POST /v1/audio/voices` from a reference clip, its transcript
and a consent id, kept in memory and, with `voices_dir`, on disk across restarts.

A voice is a CSM speaker id and, optionally, a clip with its transcript, which goes before the
request's own context as its first turn. Requests name a voice by its name or its id. Every field
of a custom voice is checked when it is created against what csm_stream accepts in a context turn,
so that a voice made is usable, never refused at each use."""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import audio, clips
from .config import SPEAKER, GatewayConfig, load_voices

logger = logging.getLogger("gateway")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_CONSENT_CHARS = 256


class VoiceError(ValueError):
    """A voice that cannot be created: the message, and the form field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class StoredVoice:
    id: str
    name: str
    speaker: int
    type: str  # "builtin" (configured) or "audio_sample" (created through the API)
    transcript: str = ""
    samples: np.ndarray | None = None  # the reference clip, mono float32 at `rate`
    rate: int = audio.SAMPLE_RATE
    created_at: int = 0
    consent: str = ""
    server_voice: str = ""  # a voice of csm_stream's voice library, sent as VOICE

    def card(self) -> dict:
        return {
            "id": self.id, "object": "audio.voice", "name": self.name, "type": self.type, "created_at": self.created_at,
            "speaker": self.speaker, "reference_clip": self.samples is not None,
        }  # fmt: skip


class VoiceLibrary:
    """The configured voices (config.voices_file) and the custom ones (kept in config.voices_dir)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.max_clip_s = config.max_voice_clip_s
        self.max_transcript_bytes = config.max_context_text_bytes
        self.bounds = clips.ClipBounds.from_config(config)
        self.directory = config.voices_dir
        self.max_custom = config.max_custom_voices
        self._lock = threading.Lock()
        self._voices: dict[str, StoredVoice] = {}
        for voice in load_voices(config.voices_file).values():
            samples, rate = (None, audio.SAMPLE_RATE)
            if voice.audio is not None:
                try:
                    samples, rate = clips.decode_audio(voice.audio.read_bytes(), self.max_clip_s, self.bounds)
                except clips.AudioInputError as error:
                    raise ValueError(f"{config.voices_file}: voice {voice.name!r}: {voice.audio} {error}") from error
            self._voices[voice.name] = StoredVoice(
                voice.name, voice.name, voice.speaker, "builtin", voice.transcript, samples, rate, server_voice=voice.server_voice
            )
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for entry in sorted(self.directory.glob("*.json")):
                self._load(entry)

    def _load(self, entry: Path) -> None:
        """A custom voice kept in voices_dir; one that a gateway of these bounds would not create
        (kept by an older one) is left out, and its files left in place."""
        meta = json.loads(entry.read_text())
        try:
            self.check_fields(meta["transcript"], meta["consent"], str(meta["speaker"]))
            samples, rate = clips.decode_audio(entry.with_suffix(".audio").read_bytes(), self.max_clip_s, self.bounds)
        except (VoiceError, clips.AudioInputError) as error:
            logger.warning("voice %s in %s left out: %s", meta["id"], self.directory, error)
            return
        self._voices[meta["id"]] = StoredVoice(**meta, type="audio_sample", samples=samples, rate=rate)

    def all(self) -> list[StoredVoice]:
        with self._lock:
            return list(self._voices.values())

    def find(self, key: str) -> StoredVoice | None:
        """By id, then by name."""
        with self._lock:
            return self._voices.get(key) or next((voice for voice in self._voices.values() if voice.name == key), None)

    def check_fields(self, transcript: str, consent: str, speaker: str) -> int:
        """The form's fields besides the name and the clip, as a context turn takes them -> the speaker id."""
        if not consent.strip() or len(consent) > MAX_CONSENT_CHARS:
            message = f"consent: the id of the speaker's consent recording is required, at most {MAX_CONSENT_CHARS} characters"
            raise VoiceError(message, "consent")
        if not transcript.strip():
            raise VoiceError("transcript: CSM needs the words spoken in audio_sample", "transcript")
        size = len(transcript.encode("utf-8"))
        if size > self.max_transcript_bytes:
            message = f"transcript: {size} bytes of UTF-8, more than max_context_text_bytes {self.max_transcript_bytes}"
            raise VoiceError(message, "transcript")
        speaker_id = int(speaker) if speaker.isascii() and speaker.isdigit() and len(speaker) <= 10 else -1
        if not SPEAKER.least <= speaker_id <= SPEAKER.most:
            raise VoiceError(f"speaker: must be a whole number in [{SPEAKER.least}, {SPEAKER.most}], got {speaker[:32]!r}", "speaker")
        return speaker_id

    def create(self, name: str, clip: bytes, transcript: str, consent: str, speaker: str) -> StoredVoice:
        """A custom voice from the form's fields, each checked before the clip is decoded."""
        if not NAME.fullmatch(name):
            raise VoiceError(f"name: {name[:80]!r} must be 1 to 64 of A-Z a-z 0-9 _ . - starting with a letter or digit", "name")
        speaker_id = self.check_fields(transcript, consent, speaker)
        try:
            samples, rate = clips.decode_audio(clip, self.max_clip_s, self.bounds)
        except clips.AudioInputError as error:
            raise VoiceError(f"audio_sample: {error}", "audio_sample") from error
        voice = StoredVoice(
            f"voice_{secrets.token_hex(12)}", name, speaker_id, "audio_sample", transcript, samples, rate, int(time.time()), consent
        )
        with self._lock:
            if any(existing.name == name for existing in self._voices.values()):
                raise VoiceError(f"name: a voice named {name!r} exists already", "name")
            if sum(existing.type == "audio_sample" for existing in self._voices.values()) >= self.max_custom:
                raise VoiceError(f"name: {self.max_custom} custom voices exist already (max_custom_voices); delete one first", "name")
            self._voices[voice.id] = voice
        if self.directory is not None:
            meta = {key: getattr(voice, key) for key in ("id", "name", "speaker", "transcript", "created_at", "consent")}
            voice_file = self.directory / f"{voice.id}.json"
            voice_file.with_suffix(".audio").write_bytes(clip)
            voice_file.write_text(json.dumps(meta))  # last: a voice is loaded at start only once its clip is there
        return voice

    def delete(self, voice_id: str) -> StoredVoice | None:
        """Removes a custom voice; None when there is none of that id (configured voices cannot be deleted)."""
        with self._lock:
            voice = self._voices.get(voice_id)
            if voice is None or voice.type != "audio_sample":
                return None
            del self._voices[voice_id]
        if self.directory is not None:
            (self.directory / f"{voice_id}.json").unlink(missing_ok=True)
            (self.directory / f"{voice_id}.audio").unlink(missing_ok=True)
        return voice
