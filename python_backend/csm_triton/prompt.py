"""Conversation segments and the 33-column prompt frames built from them.

Each prompt position is a row of 32 Mimi codebooks plus one text token, with a mask saying which
columns are present. A text segment is `[speaker]text` between BOS and EOS in the text column; an
audio segment is its Mimi codes followed by one all-zero end-of-audio frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from .codec import SAMPLE_RATE, MimiCodec, as_mono, frames_of, resample

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


@dataclass
class Segment:
    """One turn of the conversation: its speaker, its text and, optionally, its audio.

    Both the design document's form, `Segment(text=..., speaker=..., is_audio=False)`, and
    Sesame's, `Segment(speaker=..., text=..., audio=tensor)`, are accepted. Audio of any sample
    rate (`sample_rate`, default 24 kHz) is resampled to Mimi's 24 kHz.
    """

    speaker: int
    text: str
    audio: torch.Tensor | np.ndarray | None = None
    is_audio: bool | None = None
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.is_audio is None:
            self.is_audio = self.audio is not None
        if self.is_audio and self.audio is None:
            raise ValueError("segment: is_audio=True but no audio was given")
        if not self.is_audio and self.audio is not None:
            raise ValueError("segment: audio was given with is_audio=False")
        check_speaker(self.speaker, "segment speaker")
        check_text(self.text, "segment text", allow_empty=self.is_audio)
        if self.audio is not None:
            self.audio = resample(as_mono(self.audio, "segment audio"), self.sample_rate, "segment sample_rate")
            self.sample_rate = SAMPLE_RATE
            if not len(self.audio):
                raise ValueError("segment audio: must hold at least one sample")


def check_speaker(speaker: int, field: str = "speaker") -> None:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
        raise ValueError(f"{field}: must be an integer >= 0, got {speaker!r}")


def check_text(text: str, field: str = "text", allow_empty: bool = False) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{field}: must be a string, got {type(text).__name__}")
    if not text.strip() and not allow_empty:
        raise ValueError(f"{field}: must not be empty")


class TextTokenizer:
    """The Llama-3.2 tokenizer with Sesame's `BOS $A EOS` template."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        bos_id, eos_id = self.tokenizer.token_to_id(BOS), self.tokenizer.token_to_id(EOS)
        if bos_id is None or eos_id is None:
            raise ValueError(f"{tokenizer_json}: not a Llama-3 tokenizer (no {BOS} / {EOS} tokens)")
        self.tokenizer.post_processor = TemplateProcessing(single=f"{BOS}:0 $A:0 {EOS}:0", special_tokens=[(BOS, bos_id), (EOS, eos_id)])

    def encode(self, text: str, speaker: int) -> list[int]:
        return self.tokenizer.encode(f"[{speaker}]{text}").ids


class PromptBuilder:
    """Turns context segments and the utterance to speak into prompt frames [T, 33]."""

    def __init__(self, tokenizer: TextTokenizer, codec: MimiCodec, num_codebooks: int, text_vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.codec = codec
        self.num_codebooks = num_codebooks
        self.text_vocab_size = text_vocab_size

    def _text_ids(self, text: str, speaker: int) -> torch.Tensor:
        ids = torch.tensor(self.tokenizer.encode(text, speaker))
        # The shipped tokenizer knows special tokens (e.g. <|image|>) beyond the model's text vocabulary.
        if ids.max() >= self.text_vocab_size:
            raise ValueError(f"text: contains a special token outside the model's {self.text_vocab_size}-token text vocabulary: {text!r}")
        return ids

    def _text_frames(self, text: str, speaker: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._text_ids(text, speaker)
        tokens = torch.zeros(len(ids), self.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, -1] = ids
        mask[:, -1] = True
        return tokens, mask

    def _audio_frames(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.codec.encode(audio).cpu()  # [frames, 32]
        tokens = torch.zeros(len(codes) + 1, self.num_codebooks + 1, dtype=torch.long)  # + end-of-audio frame
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:-1, :-1] = codes
        mask[:, :-1] = True
        return tokens, mask

    def positions(self, text: str, speaker: int, context: list[Segment]) -> int:
        """How many positions `build` makes, found without encoding any audio, so that a request
        can be checked at once and its context audio encoded later."""
        total = len(self._text_ids(text, speaker))
        for segment in _checked(context):
            total += len(self._text_ids(segment.text, segment.speaker))
            if segment.audio is not None:
                total += frames_of(len(segment.audio)) + 1  # + the end-of-audio frame
        return total

    def build(self, text: str, speaker: int, context: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens [T, 33] int64, mask [T, 33] bool)."""
        parts = []
        for segment in _checked(context):
            parts.append(self._text_frames(segment.text, segment.speaker))
            if segment.audio is not None:
                parts.append(self._audio_frames(segment.audio))
        parts.append(self._text_frames(text, speaker))
        tokens, masks = zip(*parts, strict=True)
        return torch.cat(tokens), torch.cat(masks)


def _checked(context: list[Segment]) -> list[Segment]:
    for segment in context:
        if not isinstance(segment, Segment):
            raise ValueError(f"context: expected Segment objects, got {type(segment).__name__}")
    return context
