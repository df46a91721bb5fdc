"""The frame step with fixed shapes, captured as CUDA graphs: one backbone position for every
slot below a batch-size bucket, then the whole 31-step depth decoder with sampling.

Run eagerly, a frame of CSM is thousands of small kernel launches, which is why the reference
code is slower than real time. Captured once per (bucket, top-k bucket) and replayed, a frame is
one graph launch, a few small host-to-device copies of the rows' inputs, and the engine's one
copy of the new codes back. Shapes are fixed by running *every* slot below the bucket (rows
0..B-1, read as views of the KV caches, never gathered) and attending over all `max_seq_len`
positions under the causal mask. Rows without a running request are fed a dummy frame written at
the last cache position, which no request ever attends to (`Engine.check` keeps prompt and frames
below it), and their codes are dropped.

Off CUDA (`capture=False`) the same fixed-shape step runs eagerly, which is how the CPU tests
check it against the engine's dynamic path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .model import CSM
from .sampling import Sampler

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOPK_BUCKETS = (64, 256)  # then the whole vocabulary; the design document's presets use 30 to 150


@dataclass
class _Step:
    """One bucket's static input buffers, its output, and its graph (None when run eagerly)."""

    inputs: dict[str, torch.Tensor]
    max_topk: int  # fixes the partial sort's shape
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
        self.batch_buckets = [bucket for bucket in BATCH_BUCKETS if bucket < slots] + [slots]
        self.topk_buckets = [bucket for bucket in TOPK_BUCKETS if bucket < self.vocab_size] + [self.vocab_size]
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._steps: dict[tuple[int, int], _Step] = {}

    def warm_up(self) -> None:
        """Capture every bucket (batch x top-k) now: capturing while serving would run beside the
        audio thread's work and hold the frames of every stream."""
        for batch in self.batch_buckets:
            for max_topk in self.topk_buckets:
                self._step(batch, max_topk)
        logger.info("frame step %s for batch buckets %s", "captured" if self.capture else "ready", self.batch_buckets)

    @torch.inference_mode()
    def run(
        self,
        rows: list[int],
        frames: torch.Tensor,
        positions: list[int],
        temperature: list[float],
        topk: list[int],
        seeds: list[int],
        frame_counts: list[int],
    ) -> torch.Tensor:
        """Feed each slot in `rows` its last frame ([n, 32] on the device) at its position and
        sample its next frame with its parameters; returns the codes [n, 32], in `rows` order."""
        batch = next(bucket for bucket in self.batch_buckets if bucket > max(rows))
        step = self._step(batch, next(bucket for bucket in self.topk_buckets if bucket >= max(topk)))
        inputs = step.inputs
        _reset_to_dummies(inputs, self.max_seq_len)
        index = torch.tensor(rows, device=self.device)
        inputs["tokens"][index, 0, :-1] = frames
        inputs["positions"][index, 0] = torch.tensor(positions, device=self.device)
        inputs["temperature"][index] = torch.tensor(temperature, device=self.device)
        inputs["topk"][index] = torch.tensor(topk, device=self.device)
        inputs["seeds"][index] = torch.tensor(seeds, device=self.device)
        inputs["frames"][index] = torch.tensor(frame_counts, device=self.device)
        if step.graph is None:
            return self._frame(inputs, step.max_topk)[index]
        step.graph.replay()
        return step.codes[index]

    def _step(self, batch: int, max_topk: int) -> _Step:
        key = (batch, max_topk)
        if key not in self._steps:
            self._steps[key] = self._make_step(batch, max_topk)
        return self._steps[key]

    @torch.inference_mode()
    def _make_step(self, batch: int, max_topk: int) -> _Step:
        width = self.num_codebooks + 1
        inputs = {
            "tokens": torch.zeros(batch, 1, width, dtype=torch.long, device=self.device),
            "mask": torch.ones(batch, 1, width, dtype=torch.bool, device=self.device),
            "positions": torch.zeros(batch, 1, dtype=torch.long, device=self.device),
            "temperature": torch.ones(batch, device=self.device),
            "topk": torch.ones(batch, dtype=torch.long, device=self.device),
            "seeds": torch.zeros(batch, dtype=torch.long, device=self.device),
            "frames": torch.zeros(batch, dtype=torch.long, device=self.device),
        }
        inputs["mask"][..., -1] = False  # a fed-back frame has codebooks and no text
        _reset_to_dummies(inputs, self.max_seq_len)
        if not self.capture:
            return _Step(inputs, max_topk)
        # Warm-up on a side stream (cuBLAS and allocator set-up happen outside the capture), then
        # capture into a pool shared by all buckets, on the weights' device whichever is current
        # (torch.cuda.graph captures on the current device's stream).
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._frame(inputs, max_topk)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                codes = self._frame(inputs, max_topk)
        return _Step(inputs, max_topk, codes, graph)

    def _frame(self, inputs: dict[str, torch.Tensor], max_topk: int) -> torch.Tensor:
        """The captured work: codes [batch, 32] for rows 0..batch-1."""
        batch = inputs["tokens"].shape[0]
        hidden = self.model.backbone_forward(inputs["tokens"], inputs["mask"], batch, inputs["positions"], self.max_seq_len)[:, 0]
        sampler = Sampler(inputs["temperature"], inputs["topk"], inputs["seeds"], inputs["frames"], self.num_codebooks, max_topk)
        return self.model.sample_frame(hidden, sampler)


def _reset_to_dummies(inputs: dict[str, torch.Tensor], max_seq_len: int) -> None:
    """Every row a dummy: a zero frame at the never-attended last position, top-1 sampling."""
    inputs["tokens"].zero_()
    inputs["positions"].fill_(max_seq_len - 1)
    inputs["temperature"].fill_(1.0)
    inputs["topk"].fill_(1)
    inputs["seeds"].zero_()
    inputs["frames"].zero_()
