"""The backbone's keys and values of prompt prefixes, kept by content so that a conversation's next
turn copies its history into a slot instead of prefilling it again.

A conversation's requests share their beginnings: every reply is conditioned on the same earlier
turns, and on the reply before it, whose frames the engine has just fed through the backbone. The
pool holds those positions' keys and values in blocks of `BLOCK_POSITIONS`. A block's key is a hash
of the block's prompt frames (tokens and mask) chained to the key of the block before it, so a key
names a whole prefix at its positions, like vLLM's prefix caching: a lookup walks a prompt's
blocks from the first until one is missing, and the keys and values found are the ones a prefill of
that prefix computed (or the frame step, for a reply's own frames), copied as they are.

The blocks live in one tensor allocated at load, on the KV caches' device (device memory on CUDA,
host memory on the CPU): as many blocks as `max_bytes` holds, so the pool never holds more. Least
recently used blocks go first; a lookup or a store refreshes a prefix's blocks from its last to its
first, so that the deepest blocks of a prefix leave before the ones its others share.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch

from ..model.config import ModelConfig
from ..model.model import CSM

logger = logging.getLogger(__name__)

# Prompt positions a block holds: a prefix is reused up to its last whole block, and on the CPU each
# position prefilled again costs ~14 ms at 1B in int8, so blocks are small (vLLM's 16 are sized for GPUs).
BLOCK_POSITIONS = 4


@dataclass
class PoolStats:
    """Running totals (written by the engine's thread only) and what the pool holds now."""

    hits: int = 0  # prompts that found at least one block
    misses: int = 0  # prompts that found none
    positions_reused: int = 0  # prompt positions copied from the pool instead of prefilled
    blocks_stored: int = 0
    blocks_evicted: int = 0
    blocks: int = 0  # held now
    bytes: int = 0  # held now: blocks x block_bytes
    max_bytes: int = 0  # the bound (prefix_cache_mb): capacity x block_bytes, at most the bytes asked for


def block_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one block: the backbone's keys and values of BLOCK_POSITIONS positions."""
    backbone = config.backbone
    return backbone.num_layers * 2 * backbone.num_kv_heads * BLOCK_POSITIONS * backbone.head_dim * dtype.itemsize


def block_keys(tokens: torch.Tensor, mask: torch.Tensor, known: list[bytes], root: bytes) -> list[bytes]:
    """The chained keys of every whole block of `tokens`/`mask` ([T, 33]), those in `known` (the
    first blocks' keys, already computed) reused."""
    keys = list(known)
    tokens, mask = tokens.numpy(), mask.numpy()
    for block in range(len(keys), len(tokens) // BLOCK_POSITIONS):
        positions = slice(block * BLOCK_POSITIONS, (block + 1) * BLOCK_POSITIONS)
        digest = hashlib.blake2b(keys[-1] if keys else root, digest_size=16)
        digest.update(tokens[positions].tobytes())
        digest.update(mask[positions].tobytes())
        keys.append(digest.digest())
    return keys


class PrefixPool:
    """Blocks of backbone keys and values by prefix key, least recently used out. Used by the
    engine's thread alone (stats() may be read from others)."""

    def __init__(self, model: CSM, max_bytes: int, model_key: str = "") -> None:
        caches = [layer.attn.kv_cache for layer in model.backbone.layers]
        if any(cache is None for cache in caches):
            raise RuntimeError("the model's caches are not set up (CSM.setup_caches)")
        self.caches = caches
        _, kv_heads, max_seq_len, head_dim = caches[0].k.shape
        if max_seq_len % BLOCK_POSITIONS:
            raise ValueError(f"the backbone's {max_seq_len} positions are no whole number of {BLOCK_POSITIONS}-position blocks")
        self.block_bytes = block_bytes(model.config, caches[0].k.dtype)
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_mb: must be >= 0 (0: no prefix reuse), got {max_bytes} bytes")
        capacity = max_bytes // self.block_bytes
        # The config and weights' dtype name the model: keys of one model never match another's.
        self.root = hashlib.blake2b(f"{model.config}|{caches[0].k.dtype}|{model_key}".encode(), digest_size=16).digest()
        # [layers, (k, v), blocks, heads, B, dim]: a layer's blocks as its cache row's positions are
        # laid out, [heads, blocks, B, dim], but for the first two dimensions. Empty, not zeros: on
        # the CPU the pages of blocks never stored are never touched.
        shape = (len(caches), 2, capacity, kv_heads, BLOCK_POSITIONS, head_dim)
        self.blocks = torch.empty(shape, dtype=caches[0].k.dtype, device=caches[0].k.device)
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> block, least recently used first
        self._free = list(range(capacity - 1, -1, -1))
        self._stats = PoolStats(max_bytes=capacity * self.block_bytes)
        self._lock = threading.Lock()  # for stats() only
        logger.info(
            "prefix pool: %d blocks of %d positions (%d bytes a block) in %.1f MiB on %s",
            capacity, BLOCK_POSITIONS, self.block_bytes, capacity * self.block_bytes / 2**20, self.blocks.device,
        )  # fmt: skip

    @property
    def capacity(self) -> int:
        return self.blocks.shape[2]

    @torch.inference_mode()  # the caches may be inference tensors (an engine made under inference mode)
    def reuse(self, row: int, keys: list[bytes], most: int) -> int:
        """Copy the longest prefix of `keys`' blocks the pool holds into cache row `row`, at most
        `most` positions; returns the positions copied (0: none)."""
        found = []
        for key in keys:
            block = self._index.get(key)
            if block is None:
                break
            found.append(block)
        positions = min(len(found) * BLOCK_POSITIONS, most)
        self._touch(keys[: len(found)])
        with self._lock:
            self._stats.hits += positions > 0
            self._stats.misses += positions == 0
            self._stats.positions_reused += positions
        if positions == 0:
            return 0
        # Whole blocks: positions past `positions` in the last one are written again (by the prefill
        # or the frame step) before any query attends to them.
        used = torch.tensor(found[: -(-positions // BLOCK_POSITIONS)], device=self.blocks.device)
        for layer, cache in enumerate(self.caches):
            for part, rows in enumerate((cache.k, cache.v)):
                _blocks_of(rows, row)[:, : len(used)] = self.blocks[layer, part].index_select(0, used).transpose(0, 1)
        return positions

    @torch.inference_mode()
    def store(self, row: int, keys: list[bytes], positions: int) -> None:
        """Keep the whole blocks of cache row `row`'s first `positions` positions (their keys
        `keys`) that the pool lacks, evicting the least recently used blocks for room."""
        keys = keys[: positions // BLOCK_POSITIONS]
        self._touch(keys)  # before evicting: the prefix's own blocks go last
        missing = [index for index, key in enumerate(keys) if key not in self._index]
        # A prefix longer than the pool keeps its first blocks: deeper ones must not evict their own parents.
        missing = missing[: self.capacity - (len(keys) - len(missing))]
        if not missing:
            return
        blocks = [self._allocate() for _ in missing]
        targets, sources = (torch.tensor(indices, device=self.blocks.device) for indices in (blocks, missing))
        for layer, cache in enumerate(self.caches):
            for part, rows in enumerate((cache.k, cache.v)):
                self.blocks[layer, part].index_copy_(0, targets, _blocks_of(rows, row).index_select(1, sources).transpose(0, 1))
        self._index.update((keys[index], block) for index, block in zip(missing, blocks, strict=True))
        self._touch(keys)
        with self._lock:
            self._stats.blocks_stored += len(blocks)
            self._stats.blocks = len(self._index)
            self._stats.bytes = len(self._index) * self.block_bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return asdict(self._stats)

    def _allocate(self) -> int:
        """A free block, the least recently used one's when none is free."""
        if self._free:
            return self._free.pop()
        _, block = self._index.popitem(last=False)
        with self._lock:
            self._stats.blocks_evicted += 1
        return block

    def _touch(self, keys: list[bytes]) -> None:
        """Most recent: the prefix's first block, then the next, down to its last."""
        for key in reversed(keys):
            if key in self._index:
                self._index.move_to_end(key)


def _blocks_of(cache: torch.Tensor, row: int) -> torch.Tensor:
    """Cache `row`'s positions as blocks, a view: [slots, heads, positions, dim] -> [heads, blocks, B, dim]."""
    heads, positions, dim = cache.shape[1:]
    return cache[row].view(heads, positions // BLOCK_POSITIONS, BLOCK_POSITIONS, dim)
