"""The frame step with fixed shapes, captured as CUDA graphs: one backbone position for every
slot below a batch bucket, attending over a length bucket, then the whole 31-step depth decoder
with sampling.

Run eagerly, a frame of CSM is thousands of small kernel launches, which is why the reference
code is slower than real time. Captured once per (batch, top-k, length) bucket and replayed, a
frame is one graph launch and one copy of the new codes back to the host. Everything a slot needs
for its next frame lives on the device (`SlotState`): the host writes a slot's row when it starts
running (one upload for all of a step's starts) and stops a cancelled one with a fill, and the
step itself feeds each sampled frame back, advances the positions and frame counts and stops the
slots that ended.

Shapes are fixed by running *every* slot below the batch bucket (rows 0..B-1, read as views of
the KV caches, never gathered; the engine keeps its busy slots in the lowest rows) over the first
`length` positions of the caches, the smallest length bucket that holds the longest running
stream, under the causal mask. Rows without a running stream are fed a zero frame at the last
cache position, outside every length bucket and never attended to (`Engine.check` keeps prompt
and frames below it); their codes are dropped.

Off CUDA (`capture=False`) the same fixed-shape step runs eagerly, which is how the CPU tests
check it against the engine's dynamic path.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..model.config import MIB
from ..model.model import CSM
from ..model.sampling import Sampler

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOPK_BUCKETS = (64, 256)  # then the whole vocabulary; the design document's presets use 30 to 150
LENGTH_BUCKETS = (64, 128, 256, 512, 1024)  # then max_seq_len


class DeviceFailed(RuntimeError):
    """The device failed under a graph replay: a CUDA error leaves the context unusable, so the
    process must stop serving (the serving loop fails, and the engine process is replaced)."""


def bucket(buckets: list[int], need: int) -> int:
    return next(size for size in buckets if size >= need)


def _up_to(sizes: tuple[int, ...], limit: int) -> list[int]:
    """The bucket sizes below `limit`, then `limit` itself: the largest bucket is what there is."""
    return [size for size in sizes if size < limit] + [limit]


@dataclass(frozen=True)
class SlotStart:
    """A slot that starts running: the prompt's last position is its first input."""

    row: int
    tokens: torch.Tensor  # [33] int64
    mask: torch.Tensor  # [33] bool
    position: int
    temperature: float
    topk: int
    seed: int
    max_frames: int


# Columns of one packed row of a host-to-device update (SlotState.write).
_ROW, _POSITION, _TOPK, _SEED, _MAX_FRAMES, _TEMPERATURE, _FIELDS = range(7)


class SlotState:
    """Every slot's next input and sampling parameters, on the device, one row per slot."""

    def __init__(self, slots: int, width: int, max_seq_len: int, device: torch.device) -> None:
        self.width = width
        self.device = device
        self.tokens = torch.zeros(slots, width, dtype=torch.long, device=device)  # fed next
        self.mask = torch.zeros(slots, width, dtype=torch.bool, device=device)
        self.positions = torch.full((slots,), max_seq_len - 1, dtype=torch.long, device=device)  # where it is written
        self.temperature = torch.ones(slots, device=device)
        self.topk = torch.ones(slots, dtype=torch.long, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self.frames = torch.zeros(slots, dtype=torch.long, device=device)  # sampled so far
        self.max_frames = torch.ones(slots, dtype=torch.long, device=device)
        self.running = torch.zeros(slots, dtype=torch.bool, device=device)
        # One host buffer for a step's updates (pinned, so that the upload does not stage through
        # pageable memory); reused every step: the step's codes download waits for the upload.
        columns = _FIELDS + 2 * width
        self._staging = torch.zeros(slots, columns, dtype=torch.long, pin_memory=device.type == "cuda")
        self.uploads = 0  # host-to-device copies made (the tests count them)

    def write(self, starts: list[SlotStart]) -> None:
        """Start slots, in one upload."""
        if not starts:
            return
        count = len(starts)
        self._staging[:count] = torch.tensor([_pack(start, self.width) for start in starts], dtype=torch.long)
        update = self._staging[:count].to(self.device, non_blocking=True)
        self.uploads += 1
        rows = update[:, _ROW]
        self.running[rows] = True
        self.positions[rows] = update[:, _POSITION]
        self.topk[rows] = update[:, _TOPK]
        self.seeds[rows] = update[:, _SEED]
        self.max_frames[rows] = update[:, _MAX_FRAMES]
        self.temperature[rows] = update[:, _TEMPERATURE].to(torch.int32).view(torch.float32)
        self.frames[rows] = 0
        self.tokens[rows] = update[:, _FIELDS : _FIELDS + self.width]
        self.mask[rows] = update[:, _FIELDS + self.width :].bool()

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s row to `target` (the engine compacting its busy slots), on the device."""
        for state in self._rows():
            state[target] = state[source]
        self.running[source] = False

    def _rows(self) -> tuple[torch.Tensor, ...]:
        return (self.tokens, self.mask, self.positions, self.temperature, self.topk, self.seeds, self.frames, self.max_frames, self.running)

    def stop(self, row: int) -> None:
        """A slot that ends outside the frame step (cancelled); a fill on the device, no copy."""
        self.running[row] = False

    def clear(self) -> None:
        self.running.zero_()


def _pack(start: SlotStart, width: int) -> list[int]:
    temperature_bits = struct.unpack("<i", struct.pack("<f", start.temperature))[0]
    head = [start.row, start.position, start.topk, start.seed, start.max_frames, temperature_bits]
    return head + start.tokens.tolist() + start.mask.long().tolist()


@dataclass
class _Step:
    """One bucket's output and graph (None when run eagerly)."""

    batch: int
    max_topk: int  # fixes the partial sort's shape
    length: int  # key positions attended
    codes: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class FrameGraphs:
    def __init__(self, model: CSM, slots: int, capture: bool) -> None:
        self.model = model
        self.capture = capture
        self.device = model.audio_head.device
        self.max_seq_len = model.config.backbone.max_seq_len
        self.vocab_size = model.config.audio_vocab_size
        self.num_codebooks = model.config.audio_num_codebooks
        self.batch_buckets = _up_to(BATCH_BUCKETS, slots)
        self.topk_buckets = _up_to(TOPK_BUCKETS, self.vocab_size)
        self.length_buckets = _up_to(LENGTH_BUCKETS, self.max_seq_len)
        self.state = SlotState(slots, model.config.frame_width, self.max_seq_len, self.device)
        self._frame_mask = torch.ones(model.config.frame_width, dtype=torch.bool, device=self.device)
        self._frame_mask[-1] = False  # a fed-back frame has codebooks and no text
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._steps: dict[tuple[int, int, int], _Step] = {}
        self.runs: Counter[tuple[int, int, int]] = Counter()  # frames run per (batch, top-k, length) bucket

    def warm_up(self) -> None:
        """Capture every bucket (batch x top-k x length) now: serving never captures, which would
        run beside the audio thread's work and hold the frames of every stream."""
        start = time.monotonic()
        reserved = torch.cuda.memory_reserved(self.device) if self.capture else 0
        for batch in self.batch_buckets:
            for max_topk in self.topk_buckets:
                for length in self.length_buckets:
                    self._step(batch, max_topk, length)
        self.state.clear()
        if self.capture:
            torch.cuda.synchronize(self.device)
            reserved = torch.cuda.memory_reserved(self.device) - reserved
        logger.info(
            "frame step %s%s for %d buckets (batch %s, top-k %s, length %s) in %.1f s, %.0f MiB",
            "compiled and " if self.model.compiled else "",
            "captured" if self.capture else "ready",
            len(self._steps),
            self.batch_buckets,
            self.topk_buckets,
            self.length_buckets,
            time.monotonic() - start,
            reserved / MIB,
        )

    @torch.inference_mode()
    def run(self, rows: int, longest: int, max_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame for every running slot below `rows`, whose positions are below `longest`
        and top-k at most `max_topk`: the codes [B >= rows, 32] on the device (a copy the next
        replay leaves alone, which Mimi decodes there) and on the host, by slot."""
        key = (bucket(self.batch_buckets, rows), bucket(self.topk_buckets, max_topk), bucket(self.length_buckets, longest))
        step = self._step(*key)
        self.runs[key] += 1
        if step.graph is None:
            codes = self._frame(step)
            return codes, codes.cpu()
        try:
            step.graph.replay()
            codes = step.codes.clone()
            return codes, codes.cpu()  # the frame's one device-to-host copy, which waits for the replay
        except RuntimeError as error:  # a CUDA error is sticky: nothing on this device works after it
            raise DeviceFailed(f"the frame step failed on {self.device}: {error}") from error

    def _step(self, batch: int, max_topk: int, length: int) -> _Step:
        key = (batch, max_topk, length)
        if key not in self._steps:
            self._steps[key] = self._make_step(_Step(batch, max_topk, length))
        return self._steps[key]

    @torch.inference_mode()
    def _make_step(self, step: _Step) -> _Step:
        if not self.capture:
            if self.model.compiled:  # compiled now, at warm-up, not under a stream's first frame; advances no slot
                self._frame(step)
            return step
        # Warm-up on a side stream (cuBLAS and allocator set-up happen outside the capture), then
        # capture on it into a pool shared by all buckets, on the weights' device whichever is
        # current. The warm-up runs advance no slot: none is running at load.
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._frame(step)
            torch.cuda.current_stream(self.device).wait_stream(side)
            step.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(step.graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                step.codes = self._frame(step)
        return step

    def _frame(self, step: _Step) -> torch.Tensor:
        """The captured work: codes [batch, 32] for rows 0..batch-1, and each running row's state
        advanced to its next frame."""
        batch, state = step.batch, self.state
        running = state.running[:batch]
        positions = torch.where(running, state.positions[:batch], self.max_seq_len - 1)
        tokens = state.tokens[:batch] * running[:, None]
        hidden = self.model.backbone_forward(tokens[:, None], state.mask[:batch, None], batch, positions[:, None], step.length)[:, 0]
        topk = torch.where(running, state.topk[:batch], 1)  # a stopped row's k may exceed the bucket's
        sampler = Sampler(state.temperature[:batch], topk, state.seeds[:batch], state.frames[:batch], self.num_codebooks, step.max_topk)
        codes = self.model.sample_frame(hidden, sampler)
        self._advance(batch, codes)
        return codes

    def _advance(self, batch: int, codes: torch.Tensor) -> None:
        """What `Engine._advance` does on the host, for the running rows: an all-zero frame ends
        the stream, so does its last frame; other frames are fed back next."""
        state = self.state
        running = state.running[:batch]
        state.tokens[:batch, :-1] = torch.where(running[:, None], codes, state.tokens[:batch, :-1])
        state.tokens[:batch, -1].masked_fill_(running, 0)
        state.mask[:batch] = torch.where(running[:, None], self._frame_mask, state.mask[:batch])
        state.positions[:batch] += running
        state.frames[:batch] += running
        ended = ~codes.any(dim=1) | (state.frames[:batch] >= state.max_frames[:batch])
        running &= ~ended
