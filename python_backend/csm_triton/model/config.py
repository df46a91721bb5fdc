"""Model hyperparameters: one dataclass per transformer, named presets, and the CSM config.

`config.json` of a staged model names flavors (`"backbone_flavor": "llama-1B"`) as Sesame's
checkpoint does, or gives an explicit architecture (`"backbone": {...}`) for small test models.
The audio's facts (Mimi's rate and frame) and CSM-1B's codebooks and audio vocabulary are the wire
contract's (csm_client.contract), defined there once, as callers see them too. Torch-free: the request
contract (csm_triton.request) and the Triton stubs import it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csm_client.contract import AUDIO_NUM_CODEBOOKS, AUDIO_VOCAB_SIZE

MIB = 1 << 20

# How the linear layers are stored and run (model/quantize.py), and which schemes each device has kernels for.
QUANTIZE_SCHEMES = ("none", "bf16", "int8", "fp8")
DEVICE_SCHEMES = {"cpu": ("none", "bf16", "int8"), "cuda": ("none", "int8", "fp8")}
# The prefix pool's bound (engine/prefix_pool.py): the 1B backbone's keys and values take 64 KiB a
# position in fp32 (32 in bf16), so 512 MiB holds ~8,000 positions: a dozen conversations of 12 turns.
DEFAULT_PREFIX_CACHE_MB = 512


@dataclass(frozen=True)
class TransformerConfig:
    """A Llama-3.2-style transformer (torchtune's `llama3_2` builder, embeddings and head removed)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int = 2048
    rope_base: float = 500_000.0
    scale_factor: float = 32.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"transformer config: {name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"transformer config: embed_dim ({self.embed_dim}) must divide by num_heads ({self.num_heads}) "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"transformer config: head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        fields = dataclasses.fields(cls)
        unknown = set(values) - {f.name for f in fields}
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in values]
        if unknown or missing:
            raise ValueError(f"transformer config: unknown fields {sorted(unknown)}, missing fields {missing}")
        return cls(**values)


FLAVORS: dict[str, TransformerConfig] = {
    "llama-1B": TransformerConfig(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192),
    "llama-100M": TransformerConfig(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, intermediate_dim=8192),
    # Small flavors for tests and the out-of-the-box default (`python -m export tiny`).
    "tiny-backbone": TransformerConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=256),
    "tiny-decoder": TransformerConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128),
}


@dataclass(frozen=True)
class ModelConfig:
    """Sesame's `ModelArgs` with the two transformers resolved to explicit architectures."""

    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = AUDIO_VOCAB_SIZE
    audio_num_codebooks: int = AUDIO_NUM_CODEBOOKS
    backbone_flavor: str | None = None
    decoder_flavor: str | None = None

    @property
    def frame_width(self) -> int:
        """Columns of one prompt position: every codebook plus the text token."""
        return self.audio_num_codebooks + 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        values = dict(values)
        parts = {}
        for part in ("backbone", "decoder"):
            flavor = values.pop(f"{part}_flavor", None)
            explicit = values.pop(part, None)
            if explicit is not None:
                if not isinstance(explicit, dict):
                    raise ValueError(f"config: '{part}' must be an object of transformer fields")
                parts[part] = TransformerConfig.from_dict(explicit)
                parts[f"{part}_flavor"] = None
            elif flavor is not None:
                if flavor not in FLAVORS:
                    raise ValueError(f"config: unknown {part}_flavor {flavor!r}; known: {sorted(FLAVORS)}")
                parts[part] = FLAVORS[flavor]
                parts[f"{part}_flavor"] = flavor
            else:
                raise ValueError(f"config: give '{part}_flavor' or an explicit '{part}' architecture")
        known = {"text_vocab_size", "audio_vocab_size", "audio_num_codebooks"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**parts, **values)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of model fields")
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """Flavor names where the architecture is a named flavor, as Sesame's config.json has them."""
        values: dict[str, Any] = {}
        for part in ("backbone", "decoder"):
            flavor = getattr(self, f"{part}_flavor")
            if flavor is not None:
                values[f"{part}_flavor"] = flavor
            else:
                values[part] = dataclasses.asdict(getattr(self, part))
        values.update(
            text_vocab_size=self.text_vocab_size,
            audio_vocab_size=self.audio_vocab_size,
            audio_num_codebooks=self.audio_num_codebooks,
        )
        return values


CSM_1B = ModelConfig.from_dict({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M"})
TINY = ModelConfig.from_dict(
    {"backbone": dataclasses.asdict(FLAVORS["tiny-backbone"]), "decoder": dataclasses.asdict(FLAVORS["tiny-decoder"])}
)
