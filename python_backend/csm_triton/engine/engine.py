"""The slot-based batching engine: many requests generate frames together, joining and leaving
at frame boundaries.

Each active request owns a *slot*: a row of the KV caches, its own positions, sampling parameters,
seed and frame budget. A request starts only in a free slot: whoever drives the engine keeps the
requests that wait for one (the serving loop), so the engine has no queue, and no lock, since one
thread alone calls it; `step` advances every active slot by one frame.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..model.model import CSM, compile_hot_path
from ..model.sampling import Sampler
from .graphs import FrameGraphs, SlotStart
from .prefix_pool import PrefixPool, block_keys
from .prompt import audio_frames

logger = logging.getLogger(__name__)


class SlotRequest(Protocol):
    """What a slot reads of a request: its prompt frames and how to sample it. The engine keeps
    the request itself (the serving loop's `Stream`), never a copy of it."""

    tokens: torch.Tensor  # [T, 33] int64 prompt frames
    mask: torch.Tensor  # [T, 33] bool
    max_frames: int
    temperature: float
    topk: int
    seed: int


@dataclass(frozen=True)
class StepResult:
    """What one step did for one request: a new frame, an end, or both (the last frame)."""

    request_id: int
    codes: torch.Tensor | None  # [32] int64 on the CPU
    finish: str | None  # None while running; "eos", "length" or "cancelled"
    device_codes: torch.Tensor | None = None  # the same on the engine's device, for Mimi there; None when that is the host


@dataclass
class EngineStats:
    """Running totals, written only by the thread that calls `step` (others may read them)."""

    steps: int = 0  # steps that sampled a frame for at least one slot
    frames: int = 0  # frames generated (end-of-audio frames excluded)
    slot_steps: int = 0  # slots sampled, summed over steps: mean occupancy is slot_steps / (steps * slots)
    peak_batch: int = 0


@dataclass
class _Slot:
    request_id: int
    request: SlotRequest
    position: int = 0  # next cache position to write (while prefilling: prompt positions cached so far)
    frames: int = 0  # frames generated so far
    pending: torch.Tensor | None = None  # [32] last frame, fed to the backbone next step (dynamic path)
    in_graph: bool = False  # running on the frame step, which keeps its state on the device
    keys: list[bytes] = field(default_factory=list)  # the prefix pool's keys of its prompt's whole blocks
    generated: list[torch.Tensor] = field(default_factory=list)  # [32] codes of each frame, on the host


class Engine:
    """`frame_graphs` (default: on CUDA) runs the running slots' frames through `FrameGraphs`:
    fixed shapes, captured as CUDA graphs on CUDA, eager elsewhere (for tests). A prompt's last
    position is then fed by the frame step too, and the busy slots are kept in the lowest rows
    (a slot that frees is filled by the highest busy one), so that the batch bucket follows the
    number of streams. Otherwise the step has the shapes of the slots it runs, which is fastest
    on the CPU. `compile` (default: on CUDA) compiles the frame step's pieces before they are
    captured (model.compile_hot_path): a few fused kernels instead of thousands a frame. On the
    CPU, compiling means the fixed-shape frame step (uncaptured), compiled bucket by bucket at load.
    `prefix_pool_bytes` (0: none) bounds the PrefixPool, from which a prompt's cached beginning is
    copied instead of prefilled; a prompt, and a stream's prompt and frames when it ends, go into it."""

    def __init__(
        self,
        model: CSM,
        slots: int,
        frame_graphs: bool | None = None,
        prefill_chunk: int | None = None,
        compile: bool | None = None,
        prefix_pool_bytes: int = 0,
    ) -> None:
        if slots <= 0:
            raise ValueError(f"slots: must be positive, got {slots}")
        self.model = model
        self.num_slots = slots
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be positive or None, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk  # prompt positions a step prefills at most; None: whole prompts
        self.device = model.audio_head.device
        self.max_seq_len = model.config.backbone.max_seq_len
        self.num_codebooks = model.config.audio_num_codebooks
        self.stats = EngineStats()
        model.setup_caches(slots)
        if frame_graphs is None:
            frame_graphs = self.device.type == "cuda" or bool(compile)
        self.graphs = FrameGraphs(model, slots, capture=self.device.type == "cuda") if frame_graphs else None
        if compile is None:
            compile = self.device.type == "cuda"
        if self.graphs is not None:
            if compile:
                compile_hot_path(model)
            self.graphs.warm_up()
        self.prefix_pool = PrefixPool(model, prefix_pool_bytes) if prefix_pool_bytes else None
        self._slots: list[_Slot | None] = [None] * slots
        self._cancelled: list[StepResult] = []  # reported by the next step
        self._ids = itertools.count()

    def check(self, request: SlotRequest) -> None:
        """Raise a ValueError ("prompt: ...") if the request cannot run; nothing is queued. Its
        sampling parameters have been checked by RequestLimits.check."""
        width = self.num_codebooks + 1
        if request.tokens.dim() != 2 or request.tokens.shape[1] != width or request.tokens.shape != request.mask.shape:
            raise ValueError(
                f"prompt: expected tokens and mask of shape [T, {width}], got {list(request.tokens.shape)} and {list(request.mask.shape)}"
            )
        self.check_fields(len(request.tokens), request.max_frames)

    def check_fields(self, positions: int, max_frames: int) -> None:
        """`check` for a prompt of `positions` positions that is not built yet."""
        # The last sampled frame is never fed back, so the prompt and all but one frame must fit,
        # below the last position: prefill padding and the frame graphs' dummy rows write there.
        if positions >= self.max_seq_len - max_frames:
            raise ValueError(
                f"prompt: {positions} positions of context and text plus up to {max_frames} frames "
                f"exceed the model's {self.max_seq_len}-position limit; shorten the context or the maximum audio length, "
                "or let context_overflow 'drop_oldest' leave out the oldest turns"
            )

    def start(self, request: SlotRequest) -> int:
        """Put a request that `check` passed into a free slot (the lowest); it joins the running
        batch at the next step. Raises RuntimeError when every slot is busy: the caller admits a
        request only while `free_slots` says there is room."""
        index = next((i for i, slot in enumerate(self._slots) if slot is None), None)
        if index is None:
            raise RuntimeError(f"every one of the {self.num_slots} slots is busy")
        request_id = next(self._ids)
        slot = self._slots[index] = _Slot(request_id, request)
        if self.prefix_pool is not None:
            slot.keys = block_keys(request.tokens, request.mask, [], self.prefix_pool.root)
            # At least the prompt's last position is fed: its output samples the first frame.
            slot.position = self.prefix_pool.reuse(index, slot.keys, len(request.tokens) - 1)
        return request_id

    def cancel(self, request_id: int) -> None:
        """The request leaves its slot now, free for the next one, and the next step reports it
        "cancelled"; an id in no slot (already ended) is ignored."""
        for index, slot in enumerate(self._slots):
            if slot is not None and slot.request_id == request_id:
                self._remember(index)
                self._free(index)
                self._cancelled.append(StepResult(request_id, None, "cancelled"))

    def abort(self) -> list[int]:
        """Drop every request in a slot (after a failed step, whose state is unknown) and return
        their ids."""
        aborted = [slot.request_id for slot in self._slots if slot is not None]
        self._slots = [None] * self.num_slots
        if self.graphs is not None:
            self.graphs.state.clear()
        return aborted

    @property
    def active_slots(self) -> int:
        return sum(slot is not None for slot in self._slots)

    @property
    def free_slots(self) -> int:
        return self.num_slots - self.active_slots

    @property
    def has_work(self) -> bool:
        """A slot is busy, or a cancellation is still to be reported."""
        return self.active_slots > 0 or bool(self._cancelled)

    @torch.inference_mode()
    def step(self) -> list[StepResult]:
        results, self._cancelled = self._cancelled, []
        if self.graphs is not None:
            self._compact()
        if self.graphs is None:
            running = [i for i, slot in enumerate(self._slots) if slot is not None and slot.pending is not None]
            prefilling = [i for i, slot in enumerate(self._slots) if slot is not None and slot.pending is None]
            frames = self._sample(self._decode_running(running) | self._prefill(prefilling))
            indices = sorted(frames)
            codes = torch.stack([frames[i] for i in indices]) if frames else None
            codes_host = codes.cpu() if frames else None  # the step's one device-to-host copy
        else:
            prefilling = [i for i, slot in enumerate(self._slots) if slot is not None and not slot.in_graph]
            self._prefill(prefilling)
            self._start_in_graph([i for i in prefilling if self._slots[i].position == self._prompt_end(self._slots[i])])
            indices = [i for i, slot in enumerate(self._slots) if slot is not None and slot.in_graph]
            codes, codes_host = self._graph_frames(indices)
        if not indices:
            return results
        self.stats.steps += 1
        self.stats.slot_steps += len(indices)
        self.stats.peak_batch = max(self.stats.peak_batch, len(indices))
        for row, index in enumerate(indices):
            if self.graphs is None:
                results.append(self._advance(index, codes_host[row], codes[row], pending=codes[row]))
            else:
                results.append(self._advance(index, codes_host[index], codes[index]))
        return results

    def _free(self, index: int) -> None:
        """A slot that ends here rather than in the frame step (which stops its own ended rows)."""
        if self._slots[index].in_graph:
            self.graphs.state.stop(index)
        self._slots[index] = None

    def _remember(self, index: int) -> None:
        """Put what slot `index` has cached into the prefix pool: its prompt and the frames it fed
        back, as the next turn's prompt holds them (audio frames: codes, no text)."""
        if self.prefix_pool is None:
            return
        slot = self._slots[index]
        fed = slot.position - len(slot.request.tokens)  # frames fed back after the prompt
        if fed > 0:
            frames, frame_mask = audio_frames(torch.stack(slot.generated[:fed]))
            tokens, mask = torch.cat([slot.request.tokens, frames]), torch.cat([slot.request.mask, frame_mask])
            slot.keys = block_keys(tokens, mask, slot.keys, self.prefix_pool.root)
        self.prefix_pool.store(index, slot.keys, slot.position)

    def _compact(self) -> None:
        """Move the highest busy slots into the free rows below them (their KV cache rows and
        device state with them), so that the busy slots are rows 0..n-1."""
        free = [i for i, slot in enumerate(self._slots) if slot is None]
        for target in free:
            source = max((i for i, slot in enumerate(self._slots) if slot is not None), default=-1)
            if source < target:
                break
            slot, self._slots[source], self._slots[target] = self._slots[source], None, self._slots[source]
            self.model.move_slot(source, target, slot.position)
            if slot.in_graph:
                self.graphs.state.move(source, target)

    def _prefill(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """The next piece of each admitted prompt, oldest request first, at most `prefill_chunk`
        positions a step in all, in one backbone pass right-padded to the longest piece; the
        backbone output of each prompt completed now. A long prompt thus takes several steps
        instead of stalling the running streams' next frame. Padding is written at the last cache
        position, which no request attends to (see `check_fields`)."""
        budget = self.prefill_chunk or self.max_seq_len
        pieces = []  # (slot index, first position, positions)
        for index in sorted(indices, key=lambda i: self._slots[i].request_id):
            slot = self._slots[index]
            count = min(self._prompt_end(slot) - slot.position, budget)
            if count < 1:
                continue
            pieces.append((index, slot.position, count))
            budget -= count
        if not pieces:
            return {}
        longest = max(count for _, _, count in pieces)
        tokens = torch.zeros(len(pieces), longest, self.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        positions = torch.full((len(pieces), longest), self.max_seq_len - 1)
        for row, (index, first, count) in enumerate(pieces):
            request = self._slots[index].request
            tokens[row, :count] = request.tokens[first : first + count]
            mask[row, :count] = request.mask[first : first + count]
            positions[row, :count] = torch.arange(first, first + count)
        hidden = self.model.backbone_forward(
            tokens.to(self.device),
            mask.to(self.device),
            rows=torch.tensor([index for index, _, _ in pieces], device=self.device),
            positions=positions.to(self.device),
            length=max(first + count for _, first, count in pieces),
        )
        completed = {}
        for row, (index, first, count) in enumerate(pieces):
            slot = self._slots[index]
            slot.position = first + count
            if slot.position == self._prompt_end(slot):
                self._remember(index)
            if slot.position == len(slot.request.tokens):
                completed[index] = hidden[row, count - 1]
        return completed

    def _prompt_end(self, slot: _Slot) -> int:
        """Prompt positions the prefill caches: all, or all but the last, which the frame step feeds."""
        return len(slot.request.tokens) - (self.graphs is not None)

    def _sample(self, hidden: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The next frame's codes [32] of each slot from its backbone output [D]."""
        if not hidden:
            return {}
        indices = sorted(hidden)
        slots = [self._slots[i] for i in indices]
        sampler = Sampler(
            temperature=torch.tensor([s.request.temperature for s in slots], device=self.device),
            topk=torch.tensor([s.request.topk for s in slots], device=self.device),
            seeds=torch.tensor([s.request.seed for s in slots], device=self.device),
            frames=torch.tensor([s.frames for s in slots], device=self.device),
            num_codebooks=self.num_codebooks,
            max_topk=max(s.request.topk for s in slots),
        )
        codes = self.model.sample_frame(torch.stack([hidden[i] for i in indices]), sampler)
        return dict(zip(indices, codes, strict=True))

    def _start_in_graph(self, indices: list[int]) -> None:
        """Slots whose prompt is cached but for its last position, which the frame step feeds."""
        starts = []
        for index in indices:
            slot = self._slots[index]
            request = slot.request
            sampling = (request.temperature, request.topk, request.seed, request.max_frames)
            starts.append(SlotStart(index, request.tokens[-1], request.mask[-1], slot.position, *sampling))
            slot.in_graph = True
        self.graphs.state.write(starts)

    def _graph_frames(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """`_decode_running` and `_sample` in one fixed-shape step (see graphs.py): the codes
        [rows, 32] on the device and on the host, by slot index."""
        if not indices:
            return None, None
        slots = [self._slots[i] for i in indices]
        codes = self.graphs.run(max(indices) + 1, max(s.position for s in slots) + 1, max(s.request.topk for s in slots))
        for s in slots:
            s.position += 1
        return codes

    def _decode_running(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """One backbone position for every slot that already has a frame to feed back."""
        if not indices:
            return {}
        slots = [self._slots[i] for i in indices]
        batch = len(indices)
        tokens = torch.zeros(batch, 1, self.num_codebooks + 1, dtype=torch.long, device=self.device)
        tokens[:, 0, :-1] = torch.stack([s.pending for s in slots])
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., -1] = False
        positions = torch.tensor([[s.position] for s in slots], device=self.device)
        hidden = self.model.backbone_forward(
            tokens, mask, torch.tensor(indices, device=self.device), positions, max(s.position for s in slots) + 1
        )[:, 0]
        for s in slots:
            s.position += 1
        return dict(zip(indices, hidden, strict=True))

    def _advance(self, index: int, codes_host: torch.Tensor, codes: torch.Tensor, pending: torch.Tensor | None = None) -> StepResult:
        """The slot's new frame, on the host and the device; `pending` is the frame to feed back
        next step (the frame step feeds its own back, and stops its rows that end, by the same
        rules)."""
        slot = self._slots[index]
        on_device = None if codes.device == codes_host.device else codes
        if not codes_host.any():  # an all-zero frame is the end of the utterance; it is not audio
            self._remember(index)
            self._slots[index] = None
            return StepResult(slot.request_id, None, "eos")
        slot.frames += 1
        self.stats.frames += 1
        if self.prefix_pool is not None:
            slot.generated.append(codes_host)
        if slot.frames == slot.request.max_frames:
            self._remember(index)
            self._slots[index] = None
            return StepResult(slot.request_id, codes_host, "length", on_device)
        slot.pending = pending
        return StepResult(slot.request_id, codes_host, None, on_device)
