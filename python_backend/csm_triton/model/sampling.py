"""Top-k / temperature sampling with per-row parameters and counter-based random numbers.

Every row draws its noise from a hash of (seed, frame, codebook, token), not from a shared
generator, so a request samples the same codes alone or in any batch, in any slot, and no host
synchronisation or per-row Python loop is needed (the step stays graph-capturable).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from csm_client.contract import AUDIO_VOCAB_SIZE  # CSM's Mimi codes and the two special ones: the table a Sampler builds first

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # below 2**27: a 32-bit value times it fits in int64 without overflow
_TOKEN_SALT = 0x9E3779B9


@dataclass(frozen=True)
class Preset:
    temperature: float
    topk: int
    max_audio_length_ms: int


# The design document's guidance for three use cases, as keyword arguments of `Generator.generate`.
PRESETS: dict[str, Preset] = {
    "natural": Preset(temperature=0.9, topk=50, max_audio_length_ms=10_000),
    "deterministic": Preset(temperature=0.6, topk=30, max_audio_length_ms=10_000),
    "creative": Preset(temperature=1.1, topk=150, max_audio_length_ms=15_000),
}


def preset(name: str) -> dict[str, float | int]:
    """`generator.generate(text, speaker, context, **preset("creative"))`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return asdict(PRESETS[name])


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash on int64 tensors holding values below 2**32."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


@functools.cache
def token_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The per-token half of the noise hash, [vocab_size] int64: a constant, built once per
    vocabulary size and device (outside inference mode, so that any caller may use it)."""
    with torch.inference_mode(False):
        return _mix32((torch.arange(vocab_size, device=device) + _TOKEN_SALT) & _MASK32)


def noise_keys(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The per-row half of the noise hash, elementwise over broadcast int64 seeds and counters."""
    return _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _mix32(counters & _MASK32)))


def noise_from_keys(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """keys [B], tokens [vocab] (`token_hashes`) -> [B, vocab] float32 uniform in (0, 1)."""
    # 23 bits, so that bits + 0.5 is exact in float32 and the largest value stays below 1.
    bits = _mix32(keys[:, None] ^ tokens[None, :]) >> 9
    return (bits.float() + 0.5) * 2.0**-23


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds, counters: [B] int64 -> [B, vocab_size] float32 uniform in (0, 1)."""
    return noise_from_keys(noise_keys(seeds, counters), token_hashes(vocab_size, seeds.device))


class Sampler:
    """Samples one codebook for every row of a batch from its logits [B, vocab]. The token hashes
    are a constant table, looked up once here. Nothing else is computed ahead: a compiled step
    fuses each call's per-row work (the noise keys, the threshold) into its kernels, where ops
    computed here would each be a kernel of their own."""

    def __init__(
        self,
        temperature: torch.Tensor,
        topk: torch.Tensor,
        seeds: torch.Tensor,
        frames: torch.Tensor,
        num_codebooks: int,
        max_topk: int | None = None,
        vocab_size: int = AUDIO_VOCAB_SIZE,
    ) -> None:
        self.temperature = temperature  # [B] float32
        self.topk = topk  # [B] int64
        self.seeds = seeds  # [B] int64
        self.frames = frames  # [B] int64: index of the frame being sampled in each row's request
        self.num_codebooks = num_codebooks
        self.max_topk = max_topk  # the batch's largest k, known on the host: a partial sort suffices
        self.tokens = token_hashes(vocab_size, seeds.device)

    def __call__(self, logits: torch.Tensor, codebook: int | torch.Tensor) -> torch.Tensor:
        """logits [B, vocab] -> codes [B]; `codebook` an int or a 0-d tensor (a compiled step's)."""
        vocab_size = logits.shape[-1]
        # Ranked before the cast and the division, which are monotonic: the same k-th value, and
        # one kernel less, since the division then fuses with the ops after the sort.
        ranked = logits.topk(self.max_topk or vocab_size, dim=-1).values  # descending
        threshold = ranked.gather(1, (self.topk - 1)[:, None]).float() / self.temperature[:, None]
        logits = logits.float() / self.temperature[:, None]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        tokens = self.tokens if len(self.tokens) == vocab_size else token_hashes(vocab_size, logits.device)
        noise = noise_from_keys(noise_keys(self.seeds, self.frames * self.num_codebooks + codebook), tokens)
        # Exponential race: argmax(p / Exp(1)) draws index i with probability p_i.
        return (probs / -torch.log(noise)).argmax(dim=-1)
