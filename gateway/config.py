"""The gateway's configuration: one dataclass, each field settable by an environment variable
(`CSM_GATEWAY_<FIELD>`) or a command-line flag (`--<field>`), the flag winning."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from csm_client.contract import INPUTS, MAX_CONTEXT_SAMPLE_RATE, MAX_CONTEXT_SEGMENTS, MAX_CONTEXT_TEXT_BYTES, MIN_CONTEXT_SAMPLE_RATE
from csm_client.turns import MIN_KEY_CHARS

ENV_PREFIX = "CSM_GATEWAY_"
SPEAKER = INPUTS["SPEAKER"]  # a voice's speaker id is sent as this input
# OpenAI's built-in voice names. Each maps by default to a plain CSM speaker id, without a reference
# clip, so that clients written for OpenAI work with no voice files staged. CSM-1B's base model has no
# fixed timbre per speaker id: without a reference clip a voice varies from one seed to the next.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar")
DEFAULT_MODELS = ("csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class Voice:
    """A named voice: a CSM speaker id and, optionally, a reference clip with its transcript,
    sent before the request's own context as the first turn, or a voice of csm_stream's own voice
    library (its voices_dir), sent by name as VOICE: the server holds its clip's codes."""

    name: str
    speaker: int
    audio: Path | None = None
    transcript: str = ""
    server_voice: str = ""


def default_voices() -> dict[str, Voice]:
    return {name: Voice(name, speaker) for speaker, name in enumerate(OPENAI_VOICES)}


def load_voices(path: Path | None) -> dict[str, Voice]:
    """The default voices, with those of a JSON file on top:
    {"alloy": {"speaker": 0}, "maya": {"speaker": 1, "audio": "maya.wav", "transcript": "..."},
    "echo": {"speaker": 3, "server_voice": "narrator"}} (clip paths relative to the file;
    server_voice: a voice of csm_stream's voice library)."""
    voices = default_voices()
    if path is None:
        return voices
    entries = json.loads(path.read_text())
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: must hold a JSON object of voice name -> {{speaker, audio, transcript}}")
    for name, entry in entries.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("speaker"), int)
            or not SPEAKER.least <= entry["speaker"] <= SPEAKER.most
        ):
            raise ValueError(f"{path}: voice {name!r} needs a speaker id in [{SPEAKER.least}, {SPEAKER.most}] (an INT32 tensor)")
        audio = entry.get("audio")
        clip = (path.parent / audio) if audio else None
        if clip is not None and not clip.is_file():
            raise ValueError(f"{path}: voice {name!r}: no file {clip}")
        server_voice = entry.get("server_voice", "")
        if not isinstance(server_voice, str) or (server_voice and clip is not None):
            raise ValueError(f"{path}: voice {name!r}: server_voice must be the name of a csm_stream voice, without audio of its own")
        voices[name] = Voice(name, entry["speaker"], clip, str(entry.get("transcript", "")), server_voice)
    return voices


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass
class GatewayConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "HTTP port (GATEWAY_PORT also sets it)"})
    triton_url: str = field(default="localhost:8001", metadata={"help": "Triton's gRPC endpoint"})
    stream_model: str = field(default="csm_stream", metadata={"help": "the decoupled Triton model to stream from"})
    models: tuple[str, ...] = field(default=DEFAULT_MODELS, metadata={"help": "model names accepted (comma-separated)"})
    api_keys: tuple[str, ...] = field(default=(), metadata={"help": "Bearer keys accepted (comma-separated); none: no auth"})
    voice_keys: tuple[str, ...] = field(
        default=(), metadata={"help": "Bearer keys that may create and delete voices (comma-separated); none: no one, unless open_voices"}
    )
    open_voices: bool = field(default=False, metadata={"help": "whoever may speak may create and delete voices (true/false)"})
    cors_origins: tuple[str, ...] = field(
        default=(), metadata={"help": "origins whose web pages may call the gateway (comma-separated; * for any); none: no other origin"}
    )
    header_timeout_s: float = field(
        default=10.0, metadata={"help": "a connection closes unless each request head arrives within this of its opening or last response"}
    )
    body_timeout_s: float = field(default=20.0, metadata={"help": "a request body must arrive within this, one more second for each KiB"})
    voices_file: Path | None = field(default=None, metadata={"help": "JSON file of voices on top of the OpenAI names"})
    voices_dir: Path | None = field(default=None, metadata={"help": "where custom voices are kept (none: in memory only)"})
    max_custom_voices: int = field(default=100, metadata={"help": "custom voices at most"})
    max_voice_upload_bytes: int = field(default=10 * 1024 * 1024, metadata={"help": "largest audio_sample upload"})
    max_voice_clip_s: float = field(default=30.0, metadata={"help": "longest reference clip of a voice"})
    max_streams: int = field(default=64, metadata={"help": "requests generating at once; more get 429"})
    max_body_bytes: int = field(default=32 * 1024 * 1024, metadata={"help": "largest request body (context audio included)"})
    max_json_values: int = field(
        default=200_000, metadata={"help": "values in a JSON body at most, counted before parsing as its commas and brackets"}
    )
    max_input_chars: int = field(default=4096, metadata={"help": "longest `input` (OpenAI's limit)"})
    max_context_turns: int = field(
        default=MAX_CONTEXT_SEGMENTS, metadata={"help": "context turns of a request (csm_stream's max_context_segments)"}
    )
    max_context_text_bytes: int = field(
        default=MAX_CONTEXT_TEXT_BYTES,
        metadata={"help": "UTF-8 bytes of a context turn's text or a voice's transcript (csm_stream's parameter)"},
    )
    max_context_audio_s: float = field(default=160.0, metadata={"help": "context audio of one request, all turns"})
    min_clip_sample_rate: int = field(
        default=MIN_CONTEXT_SAMPLE_RATE, metadata={"help": "lowest sample rate of a clip (csm_stream's min_context_sample_rate)"}
    )
    max_clip_sample_rate: int = field(
        default=MAX_CONTEXT_SAMPLE_RATE, metadata={"help": "highest sample rate of a clip (csm_stream's max_context_sample_rate)"}
    )
    max_clip_channels: int = field(default=8, metadata={"help": "channels of a clip at most (mixed down to mono)"})
    turn_key: str = field(
        default="",
        repr=False,
        metadata={
            "help": f"the key that signs turn references, at least {MIN_KEY_CHARS} characters, the same on every replica; "
            "none: a random one per process, whose references no other replica opens"
        },
    )
    timeout_s: float = field(default=300.0, metadata={"help": "gRPC deadline of a stream"})
    first_chunk_frames: int | None = field(default=None, metadata={"help": "frames of the first chunk (none: the server's)"})
    log_level: str = field(default="INFO", metadata={"help": "logging level"})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> GatewayConfig:
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        if "GATEWAY_PORT" in environ:
            values["port"] = environ["GATEWAY_PORT"]
        for item in fields(cls):
            name = ENV_PREFIX + item.name.upper()
            if name in environ:
                values[item.name] = environ[name]
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**{key: _convert(key, value) for key, value in values.items()})

    @classmethod
    def from_command_line(cls, argv: Sequence[str] | None = None) -> GatewayConfig:
        parser = argparse.ArgumentParser(prog="python -m gateway", description="OpenAI-compatible speech API over Triton's csm_stream")
        for item in fields(cls):
            env = ENV_PREFIX + item.name.upper()
            parser.add_argument(
                f"--{item.name.replace('_', '-')}", dest=item.name, default=None, help=f"{item.metadata['help']} (or {env})"
            )
        return cls.from_env(**vars(parser.parse_args(argv)))

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: name at least one model")
        if self.max_streams < 1 or self.max_body_bytes < 1024 or self.max_input_chars < 1:
            raise ValueError("max_streams, max_body_bytes (>= 1024) and max_input_chars must be positive")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("header_timeout_s and body_timeout_s must be positive")
        if self.open_voices and self.voice_keys:
            raise ValueError("open_voices and voice_keys: open voices take no key; set one of them")
        if min(self.max_json_values, self.max_context_turns, self.max_context_text_bytes, self.max_clip_channels) < 1:
            raise ValueError("max_json_values, max_context_turns, max_context_text_bytes and max_clip_channels must be positive")
        if self.turn_key and len(self.turn_key) < MIN_KEY_CHARS:
            raise ValueError(f"turn_key: at least {MIN_KEY_CHARS} characters (openssl rand -hex 32), got {len(self.turn_key)}")
        if not 1 <= self.min_clip_sample_rate <= self.max_clip_sample_rate:
            raise ValueError("min_clip_sample_rate must be positive and at most max_clip_sample_rate")


def _convert(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind = {item.name: item.type for item in fields(GatewayConfig)}[name]
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        if value.lower() not in BOOLEANS:
            raise ValueError(f"{name}: true or false, got {value!r}")
        return BOOLEANS[value.lower()]
    if kind == "int | None":
        return int(value) if value else None
    if kind == "tuple[str, ...]":
        return _split(value)
    if kind == "Path | None":
        return Path(value) if value else None
    return value
