"""The 33-column prompt frames built from the conversation segments and the text to speak.

Each prompt position is a row of 32 Mimi codebooks plus one text token, with a mask saying which
columns are present. A text segment is `[speaker]text` between BOS and EOS in the text column; an
audio segment is its Mimi codes followed by one all-zero end-of-audio frame.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from ..model.codec import MimiCodec, resample
from ..request import Segment, audio_key, audio_positions

logger = logging.getLogger(__name__)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
# Mimi codes of context audio kept by content: a conversation sends its earlier turns (and a voice
# its reference clip) again with every request, and encoding them costs about as much as generating.
# int16 codes (< 2048) of 64 MiB hold ~23 minutes of audio. csm_stream's codes_cache_mb parameter
# sets the bound (0: no cache); CSM_CODES_CACHE_MB in the server's environment overrides it.
DEFAULT_CODES_CACHE_MB = 64


def codes_cache_bytes(megabytes: int = DEFAULT_CODES_CACHE_MB) -> int:
    """The codes cache's bound in bytes: `megabytes`, unless CSM_CODES_CACHE_MB is set."""
    override = os.environ.get("CSM_CODES_CACHE_MB")
    megabytes = int(override) if override else megabytes
    if megabytes < 0:
        raise ValueError(f"codes_cache_mb: must be >= 0 (0: no cache), got {megabytes}")
    return megabytes * 2**20


class CodesCache:
    """Mimi codes by audio_key, least recently used out past `max_bytes` (0: no cache). Thread-safe."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = codes_cache_bytes() if max_bytes is None else max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            codes = self._entries.get(key)
            if codes is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return codes

    def put(self, key: str, codes: torch.Tensor) -> None:
        size = codes.numel() * codes.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = codes
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.numel() * dropped.element_size()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """The running totals (a miss is a clip Mimi-encoded) and what the cache holds now."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "clips": len(self._entries), "max_bytes": self.max_bytes}


def audio_frames(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt frames of audio: codes [frames, 32] -> (tokens, mask) [frames, 33], every codebook
    column present and no text. A context turn's codes, and the frames a stream fed back, which the
    prefix pool keys as the next turn's prompt will hold them."""
    tokens = torch.zeros(len(codes), codes.shape[1] + 1, dtype=torch.long)
    tokens[:, :-1] = codes
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :-1] = True
    return tokens, mask


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

    def __init__(
        self, tokenizer: TextTokenizer, codec: MimiCodec, num_codebooks: int, text_vocab_size: int, codes_cache: CodesCache | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.codec = codec
        self.num_codebooks = num_codebooks
        self.text_vocab_size = text_vocab_size
        self.codes_cache = CodesCache() if codes_cache is None else codes_cache

    def _text_ids(self, text: str, speaker: int) -> torch.Tensor:
        ids = torch.tensor(self.tokenizer.encode(text, speaker))
        # The shipped tokenizer knows special tokens (e.g. <|image|>) beyond the model's text vocabulary.
        if ids.max() >= self.text_vocab_size:
            raise ValueError(
                f"prompt: a text holds a special token outside the model's {self.text_vocab_size}-token text vocabulary: {text!r}"
            )
        return ids

    def _text_frames(self, text: str, speaker: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._text_ids(text, speaker)
        tokens = torch.zeros(len(ids), self.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, -1] = ids
        mask[:, -1] = True
        return tokens, mask

    def audio_codes(self, segment: Segment) -> torch.Tensor:
        """The clip's Mimi codes [frames, 32], encoded once per content while the cache holds them."""
        key = audio_key(segment.audio, segment.sample_rate)
        codes = self.codes_cache.get(key)
        if codes is None:
            # A copy: the array may be a read-only view of the bytes it arrived in (protocol.Channel).
            audio = resample(torch.tensor(segment.audio), segment.sample_rate)
            codes = self.codec.encode(audio).cpu().to(torch.int16)  # [frames, 32]; codes < 2048
            self.codes_cache.put(key, codes)
            cache = self.codes_cache
            logger.info(
                "context audio %s: Mimi-encoded %d frames (codes cache: %d clips, %d bytes, %d hits, %d misses)",
                key[:16], len(codes), len(cache), cache.bytes, cache.hits, cache.misses,
            )  # fmt: skip
        return codes

    def _audio_frames(self, segment: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        # [frames, 32]: codes the request sent are used as they are (checked to be < audio_vocab_size)
        codes = torch.from_numpy(segment.codes.astype(np.int64)) if segment.codes is not None else self.audio_codes(segment)
        return audio_frames(torch.cat([codes.long(), torch.zeros(1, self.num_codebooks, dtype=torch.long)]))  # + end-of-audio frame

    def positions(self, text: str, speaker: int, context: list[Segment]) -> int:
        """How many positions `build` makes, counted from the audio's sample counts and rates
        without resampling or encoding it, so that a request can be checked at once and its
        context audio resampled and encoded later."""
        return len(self._text_ids(text, speaker)) + sum(self.segment_positions(segment) for segment in context)

    def segment_positions(self, segment: Segment) -> int:
        """The positions one context segment takes in the prompt (`positions`' count)."""
        total = len(self._text_ids(segment.text, segment.speaker))
        if segment.audio is not None:
            total += audio_positions(len(segment.audio), segment.sample_rate)
        elif segment.codes is not None:
            total += len(segment.codes) + 1
        return total

    def build(self, text: str, speaker: int, context: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens [T, 33] int64, mask [T, 33] bool); resamples and encodes the context audio
        (context codes are used as they are)."""
        parts = []
        for segment in context:
            parts.append(self._text_frames(segment.text, segment.speaker))
            if segment.audio is not None or segment.codes is not None:
                parts.append(self._audio_frames(segment))
        parts.append(self._text_frames(text, speaker))
        tokens, masks = zip(*parts, strict=True)
        return torch.cat(tokens), torch.cat(masks)
