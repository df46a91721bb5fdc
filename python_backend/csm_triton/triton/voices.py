"""csm_stream's voice library: reference clips with their transcripts and speaker ids, named by
requests (the VOICE input), never by a path.

`voices_dir` (a config.pbtxt parameter) holds `voices.json`, one entry per voice:
`{"narrator": {"clip": "narrator.wav", "transcript": "What the clip says.", "speaker": 0}}`, each
clip a mono file (WAV, FLAC...) beside the manifest. The engine Mimi-encodes every clip once, at
load, and the stub keeps the codes: a request naming a voice gets its clip's codes as its first
context segment (`Segment(codes=...)`), so no request encodes a voice again. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_client.contract import INPUTS
from csm_client.segment import mono_samples

from ..request import RequestLimits

MANIFEST = "voices.json"
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no path separators: a name, never a path


@dataclass(frozen=True)
class VoiceClip:
    """One voice of the library as read from its directory, before it is encoded."""

    name: str
    speaker: int
    transcript: str
    samples: np.ndarray  # [samples] float32
    sample_rate: int


def read_voices(directory: Path, limits: RequestLimits) -> list[VoiceClip]:
    """Every voice of `directory`'s manifest with its clip read, each checked as a request's
    context segment would be; a ValueError naming the voice otherwise."""
    import soundfile  # the engine's environment has it; the stub never reads clips

    manifest = directory / MANIFEST
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"voices_dir: cannot read {manifest} ({error})") from error
    if not isinstance(entries, dict):
        raise ValueError(f"voices_dir: {manifest} must be a JSON object of voices by name")
    voices = []
    for name, entry in entries.items():
        label = f"voices_dir: voice {name!r}"
        if not VOICE_NAME.fullmatch(name):
            raise ValueError(f"{label}: a name is 1 to 64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
        if not isinstance(entry, dict) or set(entry) != {"clip", "transcript", "speaker"}:
            raise ValueError(f'{label}: must be {{"clip": <file beside {MANIFEST}>, "transcript": <text>, "speaker": <id>}}')
        clip, transcript, speaker = entry["clip"], entry["transcript"], entry["speaker"]
        if not isinstance(clip, str) or Path(clip).name != clip or clip in ("", ".", ".."):
            raise ValueError(f"{label}: clip must be a file name in {directory}, got {clip!r}")
        if not isinstance(transcript, str) or not transcript.strip() or len(transcript.encode()) > limits.max_context_text_bytes:
            raise ValueError(f"{label}: transcript must be text of 1 to max_context_text_bytes {limits.max_context_text_bytes} bytes")
        if isinstance(speaker, bool) or not isinstance(speaker, int) or not INPUTS["SPEAKER"].least <= speaker <= INPUTS["SPEAKER"].most:
            raise ValueError(f"{label}: speaker must be an integer id >= {INPUTS['SPEAKER'].least}, got {speaker!r}")
        try:
            audio, rate = soundfile.read(directory / clip, dtype="float32", always_2d=True)  # [samples, channels]
        except (OSError, soundfile.LibsndfileError) as error:
            raise ValueError(f"{label}: cannot read {clip} as audio ({error})") from error
        if audio.shape[1] != 1 or not len(audio):
            raise ValueError(f"{label}: {clip} must be mono audio with samples, got shape {list(audio.shape)}")
        limits.check_sample_rate(rate, f"{label}: {clip}'s sample rate")
        voices.append(VoiceClip(name, speaker, transcript, mono_samples(audio[:, 0], f"{label}: {clip}:"), rate))
    return voices
