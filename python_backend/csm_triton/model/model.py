"""CSM model math: the backbone, the depth decoder and the heads, with per-slot KV caches.

Parameter names follow Sesame's original checkpoint (torchtune layout), so `model.safetensors`
loads without renaming. Unlike torchtune's `KVCache`, which keeps one position for the whole
batch, every cache row here is a *slot* written at its own positions, so requests at different
points of their generation share one batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MIB, ModelConfig, TransformerConfig
from .quantize import SCALE_SUFFIX
from .sampling import Sampler

logger = logging.getLogger(__name__)

# torchtune's Llama-3 RoPE scaling constants (Llama3ScaledRoPE defaults, used by llama3_2).
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_OLD_CONTEXT_LEN = 8192
FUSED_SUFFIXES = ("weight", SCALE_SUFFIX)  # what a fused layer's parts hold: every layer a weight, an int8 one its scales


def rope_table(config: TransformerConfig) -> torch.Tensor:
    """cos/sin of every position: [max_seq_len, head_dim // 2, 2], Llama-3 frequency scaling."""
    dim = config.head_dim
    freqs = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2)[: dim // 2].double() / dim))
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_HIGH_FREQ_FACTOR
    smooth = (ROPE_OLD_CONTEXT_LEN / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * freqs / config.scale_factor + smooth * freqs
    scaled = torch.where(wavelen < high_freq_wavelen, freqs, torch.where(wavelen > low_freq_wavelen, freqs / config.scale_factor, blended))
    angles = torch.outer(torch.arange(config.max_seq_len).double(), scaled)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, S, heads, head_dim]; rope: [B, S, head_dim // 2, 2]. torchtune's interleaved pairs."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope.unsqueeze(2)
    rotated = torch.stack(
        [
            pairs[..., 0] * rope[..., 0] - pairs[..., 1] * rope[..., 1],
            pairs[..., 1] * rope[..., 0] + pairs[..., 0] * rope[..., 1],
        ],
        dim=-1,
    )
    return rotated.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.scale


class KVCache(nn.Module):
    """Keys and values of every slot: [slots, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, slots: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (slots, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, rows: torch.Tensor | int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([B, S, kv_heads, head_dim]) at each row's positions ([B, S]); return the
        first `length` positions of those rows: [B, kv_heads, length, head_dim]. `rows` is a
        tensor of row indices, or a count B for rows 0..B-1, whose keys are then read as views
        instead of gathered (at 256 rows of 2048 positions a gather would copy gigabytes a step)."""
        index = torch.arange(rows, device=positions.device) if isinstance(rows, int) else rows
        self.k[index[:, None], :, positions] = k
        self.v[index[:, None], :, positions] = v
        read = slice(rows) if isinstance(rows, int) else rows
        return self.k[read, :, :length], self.v[read, :, :length]


def kv_cache_bytes_per_slot(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes that one slot adds to the KV caches `CSM.setup_caches` allocates: for each transformer,
    layers x (k, v) x kv_heads x positions x head_dim elements, the backbone over its max_seq_len
    positions and the depth decoder over one frame's audio_num_codebooks positions. Lets a
    deployment bound the caches by memory before it allocates them."""
    elements = 0
    for transformer, positions in ((config.backbone, config.backbone.max_seq_len), (config.decoder, config.audio_num_codebooks)):
        elements += transformer.num_layers * 2 * transformer.num_kv_heads * positions * transformer.head_dim
    return elements * dtype.itemsize


def slots_within_budget(slots: int, kv_cache_memory_mb: int, config: ModelConfig, dtype: torch.dtype) -> int:
    """`slots`, or as many as `kv_cache_memory_mb` (0: no bound) holds the KV caches of when that
    is fewer: the caches' memory is fixed at load, so a server shared with other models can bound
    it. Raises a ValueError naming the parameter when not even one slot fits."""
    per_slot = kv_cache_bytes_per_slot(config, dtype)
    fitting = kv_cache_memory_mb * MIB // per_slot if kv_cache_memory_mb else slots
    if fitting < 1:
        raise ValueError(
            f"kv_cache_memory_mb: {kv_cache_memory_mb} MiB holds no slot; one slot's KV caches take "
            f"{per_slot / MIB:.2f} MiB in {dtype}. Raise it, or set 0 for no bound"
        )
    chosen = min(slots, fitting)
    logger.info(
        "KV caches: %d bytes (%.2f MiB) a slot in %s; %d slots, %.1f MiB in all (slots %d, kv_cache_memory_mb %d)",
        per_slot,
        per_slot / MIB,
        dtype,
        chosen,
        chosen * per_slot / MIB,
        slots,
        kv_cache_memory_mb,
    )
    return chosen


def fused_linear(parent: nn.Module, name: str, in_features: int, parts: dict[str, int]) -> nn.Linear:
    """One bias-free Linear standing for several with the same input (`parts`: name -> out
    features), its weight their rows stacked in order, so one matmul does their work. State dicts
    keep the parts' names: loading concatenates `{part}.weight` into `{name}.weight` (a pre-hook,
    so `assign=True` and meta-device loading work unchanged) and `state_dict()` splits it back
    into copies (safetensors refuses tensors that share memory). An int8 layer's per-row
    `weight_scale` (model/quantize.py) is joined and split the same way."""
    sizes = list(parts.values())

    def concatenate(module, state, prefix, *args) -> None:
        for suffix in FUSED_SUFFIXES:
            keys = [f"{prefix}{part}.{suffix}" for part in parts]
            if all(key in state for key in keys):
                state[f"{prefix}{name}.{suffix}"] = torch.cat([state.pop(key) for key in keys])

    def split(module, state, prefix, metadata) -> None:
        for suffix in FUSED_SUFFIXES:
            fused = state.pop(f"{prefix}{name}.{suffix}", None)  # absent once packed for a CPU kernel
            if fused is not None:
                state.update((f"{prefix}{part}.{suffix}", piece.clone()) for part, piece in zip(parts, fused.split(sizes), strict=True))

    parent.register_load_state_dict_pre_hook(concatenate)
    parent.register_state_dict_post_hook(split)
    return nn.Linear(in_features, sum(sizes), bias=False)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        head_dim = config.head_dim
        self.sizes = [config.num_heads * head_dim, config.num_kv_heads * head_dim, config.num_kv_heads * head_dim]
        self.qkv_proj = fused_linear(self, "qkv_proj", config.embed_dim, dict(zip(("q_proj", "k_proj", "v_proj"), self.sizes, strict=True)))
        self.output_proj = nn.Linear(config.num_heads * head_dim, config.embed_dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor | int, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        head_dim = self.config.head_dim
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = apply_rope(q.view(batch, seq, self.config.num_heads, head_dim), rope)
        k = apply_rope(k.view(batch, seq, self.config.num_kv_heads, head_dim), rope)
        v = v.view(batch, seq, self.config.num_kv_heads, head_dim)
        keys, values = self.kv_cache.update(rows, positions, k, v, mask.shape[-1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return self.output_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.w13 = fused_linear(self, "w13", config.embed_dim, {"w1": config.intermediate_dim, "w3": config.intermediate_dim})
        self.w2 = nn.Linear(config.intermediate_dim, config.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor | int, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        h = x + self.attn(self.sa_norm(x), rope, rows, positions, mask)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """A stack of layers and the final norm; input embeddings and output head live outside."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.rope: torch.Tensor | None = None

    def setup_caches(self, slots: int, max_seq_len: int, dtype: torch.dtype) -> None:
        device = self.norm.scale.device
        self.rope = rope_table(self.config).to(device)
        for layer in self.layers:
            cache = layer.attn.kv_cache
            if cache is None or cache.k.shape[0] != slots or cache.k.shape[2] != max_seq_len or cache.k.dtype != dtype:
                layer.attn.kv_cache = KVCache(slots, self.config.num_kv_heads, max_seq_len, self.config.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | int, positions: torch.Tensor, length: int) -> torch.Tensor:
        """x: [B, S, D] at `positions` [B, S] of cache `rows` ([B], or B for rows 0..B-1); attends to the first `length`
        positions of each row, causally. Returns the normed hidden states [B, S, D]."""
        key_positions = torch.arange(length, device=x.device)
        mask = (key_positions[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, S, length]
        rope = self.rope[positions]
        for layer in self.layers:
            x = layer(x, rope, rows, positions, mask)
        return self.norm(x)


class CSM(nn.Module):
    """Backbone over 33-column frames, codebook-0 head, and the depth decoder for codebooks 1..31."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Transformer(config.backbone)
        self.decoder = Transformer(config.decoder)
        dim = config.backbone.embed_dim
        self.text_embeddings = nn.Embedding(config.text_vocab_size, dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, dim)
        self.projection = nn.Linear(dim, config.decoder.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(dim, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(torch.empty(config.audio_num_codebooks - 1, config.decoder.embed_dim, config.audio_vocab_size))
        self.codebook_offsets: torch.Tensor | None = None
        self.codebook_ids: torch.Tensor | None = None
        self._compiled: _CompiledSteps | None = None  # set by compile_hot_path

    def setup_caches(self, slots: int) -> None:
        """Allocate the KV caches and position tables once, on the weights' device (idempotent): a
        backbone row per slot, and a decoder row per slot holding one frame's [h, c0, c1 .. c30]
        positions (the decoder restarts every frame). Plain attributes, not buffers, so that loading
        onto the meta device and casting the weights never touch them."""
        dtype = self.audio_head.dtype  # a raw parameter: never swapped for a packed kernel
        self.codebook_ids = torch.arange(self.config.audio_num_codebooks, device=self.audio_head.device)
        self.codebook_offsets = self.codebook_ids * self.config.audio_vocab_size
        self.backbone.setup_caches(slots, self.config.backbone.max_seq_len, dtype)
        self.decoder.setup_caches(slots, self.config.audio_num_codebooks, dtype)

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Slot `source`'s first `length` cached backbone positions to slot `target` (the engine
        compacting its busy slots); the decoder's cache holds one frame only and is not kept."""
        for layer in self.backbone.layers:
            cache = layer.attn.kv_cache
            cache.k[target, :, :length] = cache.k[source, :, :length]
            cache.v[target, :, :length] = cache.v[source, :, :length]

    def embed_frames(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask: [B, S, 33] -> [B, S, D], the masked sum of the text and codebook embeddings."""
        text = self.text_embeddings(tokens[..., -1:])
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)
        embeds = torch.cat([audio, text], dim=-2)
        return (embeds * mask.unsqueeze(-1).to(embeds.dtype)).sum(dim=-2)

    @property
    def compiled(self) -> bool:
        """Whether compile_hot_path has been applied."""
        return self._compiled is not None

    def backbone_forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | int, positions: torch.Tensor, length: int
    ) -> torch.Tensor:
        """Run frames through the backbone; returns the hidden states [B, S, D]. After
        `compile_hot_path`, the frame step's shape (one position for rows 0..B-1, `rows` a count)
        runs compiled; prefill and the engine's dynamic path (rows by index) stay eager rather
        than compile once per prompt length."""
        if self._compiled is not None and isinstance(rows, int) and tokens.shape[1] == 1:
            return self._compiled.backbone(tokens, mask, rows, positions, length)
        return self._backbone_step(tokens, mask, rows, positions, length)

    def _backbone_step(
        self, tokens: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | int, positions: torch.Tensor, length: int
    ) -> torch.Tensor:
        return self.backbone(self.embed_frames(tokens, mask), rows, positions, length)

    def sample_frame(self, hidden: torch.Tensor, sample) -> torch.Tensor:
        """hidden: [B, D] backbone output -> codes [B, 32]. `sample(logits, codebook)` draws one
        codebook's codes [B] from its logits [B, vocab]; `codebook` is an int or a 0-d tensor.
        After `compile_hot_path`, a `Sampler` runs inside the compiled steps; any other callable
        runs the same steps eagerly."""
        steps = self._compiled if self._compiled is not None and isinstance(sample, Sampler) else self
        codes = list(steps._first_decoder_step(hidden, sample))
        for codebook in range(2, self.config.audio_num_codebooks):
            codes.append(steps._decoder_step(codes[-1], self.codebook_ids[codebook], self.audio_head[codebook - 1], sample))
        return torch.stack(codes, dim=1)

    def _first_decoder_step(self, hidden: torch.Tensor, sample) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebooks 0 and 1 ([B] each): c0 from the backbone's head, then the decoder over
        [h, embed(c0)] at positions 0 and 1."""
        batch = hidden.shape[0]
        c0 = sample(self.codebook0_head(hidden), 0)
        x = torch.stack([hidden, self.audio_embeddings(c0)], dim=1)  # [B, 2, D]
        positions = torch.arange(2, device=hidden.device).expand(batch, 2)
        decoded = self.decoder(self.projection(x), batch, positions, self.config.audio_num_codebooks)[:, -1]
        return c0, sample(decoded @ self.audio_head[0], 1)

    def _decoder_step(self, previous: torch.Tensor, codebook: torch.Tensor, head: torch.Tensor, sample) -> torch.Tensor:
        """Codebook i's codes [B] from codebook i-1's (`previous` [B]), for i = 2..31: `codebook`
        is i as a 0-d device tensor and `head` is audio_head[i-1] (a view, never copied), so one
        step, compiled once, serves all 30. Codebook i-1's input sits at decoder position i; the
        decoder attends over its cache's fixed audio_num_codebooks positions, the later ones
        (left from the last frame) masked out, which contribute exact zeros."""
        batch = previous.shape[0]
        x = self.audio_embeddings(previous + (codebook - 1) * self.config.audio_vocab_size)[:, None]  # [B, 1, D]
        positions = codebook.expand(batch, 1)
        decoded = self.decoder(self.projection(x), batch, positions, self.config.audio_num_codebooks)[:, -1]
        return sample(decoded @ head, codebook)


@dataclass
class _CompiledSteps:
    backbone: Callable
    _first_decoder_step: Callable
    _decoder_step: Callable


def compile_hot_path(model: CSM) -> None:
    """Make `model.backbone_forward` (its fixed-shape decode step) and `model.sample_frame` (with a
    `Sampler`) run torch.compile'd pieces (idempotent): the backbone step, the first decoder step
    and the repeated decoder step, each with its sampler calls inside. Each compiles on its first
    calls, with symbolic shapes, whole graphs and no host synchronisation, so a compiled frame can
    still be captured as one CUDA graph. In float32 the
    compiled pieces sample the eager codes; in bfloat16 inductor keeps float32 between the ops it
    fuses, rounding less often than eager, so sampled codes can differ from eager ones, as they can
    with int8 layers (model/quantize.py), whose activations' rounding to integers magnifies the
    fused kernels' different fp32 rounding. Packed CPU layers run inside the graphs through the
    csm::packed_linear op."""
    if model._compiled is not None:
        return
    # Batch, length and top-k symbolic, so that the buckets of the frame step share a few graphs:
    # two a piece were measured across batch, length and top-k buckets 64 and 256, batch 1 being
    # one (dynamo always specialises it); tests/test_hot_path.py bounds them at 6 in all. Duck
    # sizing would tie the batch to the slot count of the state the rows are views of.
    from torch.fx.experimental import _config as symbolic_shapes_config

    symbolic_shapes_config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    steps = (model._backbone_step, model._first_decoder_step, model._decoder_step)
    model._compiled = _CompiledSteps(*(torch.compile(step, fullgraph=True, dynamic=True) for step in steps))
