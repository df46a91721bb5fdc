"""The work one frame of the fixed-shape step asks of a device, counted on the CPU: the figures the
GPU hot path (issue 12) is judged by, at CSM-1B's layer counts (16 backbone layers, 4 decoder
layers, 32 codebooks, 2048 positions) with small widths, so that it runs anywhere in seconds.

The step is `FrameGraphs._frame`, what the engine captures as a CUDA graph: one backbone position
for every slot of a batch bucket over its length bucket, the 31-step depth decoder, sampling, each
slot's state advanced on the device. For one frame of --batch streams at --position it prints and
writes (--json):
- eager_ops_per_frame: aten ops the eager step dispatches, views excluded (they launch nothing),
  in all and by part (the backbone position, the codebook heads and depth decoder, the sampler's
  tables and calls); on a GPU each is a kernel launch, a few microseconds each even inside a graph.
- graphs, graph_breaks: what torch._dynamo.explain makes of the step (--no-explain skips it).
- kv_positions_read_per_slot: the key positions each attention call reads for a slot, for a batch
  whose longest stream is at position --position (100), next to that position.
- compiled_kernels_per_frame: kernels one frame of the same step runs once `compile_hot_path` has
  compiled its pieces (the backbone step, the first and the repeated decoder step, the sampler
  inside them), counted at run time: one frame under torch.profiler, with inductor's
  `cpp.enable_kernel_profile` so that each generated C++ kernel is an event; the events directly
  inside each compiled graph's call are its kernels (generated, `graph_N_cpp_*`) and its extern
  calls (aten matmuls, attention, top-k), allocations (`aten::empty*`) and views left out; to
  them are added the eager aten ops the frame runs between the graphs, views left out. Also
  by kind, and compile_s: the seconds the first compiled frame took (all compiling happens
  there; inductor's on-disk caches make a rerun faster, TORCHINDUCTOR_FORCE_DISABLE_CACHES=1
  times a cold compile). --no-compile skips it.
- host_device_copies_per_frame: in one engine step with every slot running on the frame step
  (`Engine(frame_graphs=True)`): copies to the device (`Tensor.to` it, `torch.tensor(device=)`)
  and back (`Tensor.cpu`); also those of the step that started the streams.

Usage: python bench/frame_bench.py [--batch 8] [--position 100] [--json OUT] [--no-explain] [--no-compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_bench import prompt
from torch.utils._python_dispatch import TorchDispatchMode

from csm_triton.engine.engine import Engine
from csm_triton.engine.graphs import FrameGraphs, SlotStart, bucket
from csm_triton.model.config import CSM_1B, ModelConfig
from csm_triton.model.model import CSM, compile_hot_path
from csm_triton.model.sampling import Sampler

logger = logging.getLogger("frame_bench")

# CSM-1B's depth and vocabularies, narrow: the counts depend on the layers, not their widths.
NARROW = {"embed_dim": 64, "intermediate_dim": 128, "num_heads": 4, "num_kv_heads": 2}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, views excluded, under the label `part` says."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.by_part: Counter[str] = Counter()
        self.part = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket)] += 1
            self.by_part[self.part] += 1
        return func(*args, **(kwargs or {}))


def narrow_config() -> ModelConfig:
    return dataclasses.replace(
        CSM_1B,
        backbone=dataclasses.replace(CSM_1B.backbone, **NARROW),
        decoder=dataclasses.replace(CSM_1B.decoder, **NARROW),
        backbone_flavor=None,
        decoder_flavor=None,
    )


def labelled(counter: OpCounter, part: str, function: Callable) -> Callable:
    """`function`, counting its ops under `part` (the part around it resumes after)."""

    def wrapper(*args, **kwargs):
        outer, counter.part = counter.part, part
        try:
            return function(*args, **kwargs)
        finally:
            counter.part = outer

    return wrapper


def running_step(graphs: FrameGraphs, batch: int, position: int):
    """The frame step's bucket for `batch` streams at `position`, each slot started on it (top-k 50)."""
    frame = torch.zeros(graphs.state.width, dtype=torch.long)
    mask = torch.ones(graphs.state.width, dtype=torch.bool)
    mask[-1] = False
    graphs.state.write([SlotStart(row, frame, mask, position, 0.9, 50, row, 1000) for row in range(batch)])
    return graphs._step(bucket(graphs.batch_buckets, batch), bucket(graphs.topk_buckets, 50), bucket(graphs.length_buckets, position + 1))


def count_frame_ops(graphs: FrameGraphs, batch: int, position: int) -> OpCounter:
    """The ops of one eager frame step over `batch` rows, by part."""
    model = graphs.model
    step = running_step(graphs, batch, position)
    counter = OpCounter()
    model.backbone_forward = labelled(counter, "backbone position", model.backbone_forward)
    model.sample_frame = labelled(counter, "heads and depth decoder", model.sample_frame)
    sampler_init, sampler_call = Sampler.__init__, Sampler.__call__
    Sampler.__init__ = labelled(counter, "sampler", sampler_init)  # its per-frame tables
    Sampler.__call__ = labelled(counter, "sampler", sampler_call)
    try:
        with torch.inference_mode(), counter:
            graphs._frame(step)
    finally:
        Sampler.__init__, Sampler.__call__ = sampler_init, sampler_call
        del model.backbone_forward, model.sample_frame
    return counter


def kv_positions_read(graphs: FrameGraphs, batch: int, position: int) -> list[int]:
    """Key positions each attention call of one frame reads for a slot, with every row at `position`."""
    reads: list[int] = []
    attention = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        reads.append(key.shape[-2])
        return attention(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        running_step(graphs, batch, position)
        graphs.run(batch, position + 1, 50)
    finally:
        F.scaled_dot_product_attention = attention
    return reads


def host_device_copies(model: CSM, batch: int) -> dict[str, int]:
    """Host-to-device copies (`Tensor.to` the engine's device, `torch.tensor(..., device=)`) and
    device-to-host copies (`Tensor.cpu`) of one engine step once `batch` streams run on the frame
    step; on the CPU they are counted where a GPU would copy. Also those of the step that starts
    them (their prompts' prefill and the slots' one state upload)."""
    engine = Engine(model, batch, frame_graphs=True)
    calls: Counter[str] = Counter()
    make, move, download = torch.tensor, torch.Tensor.to, torch.Tensor.cpu

    def counted(kind: str, function: Callable, is_copy: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            calls[kind] += is_copy(*args, **kwargs)
            return function(*args, **kwargs)

        return wrapper

    torch.tensor = counted("uploads", make, lambda *args, device=None, **kwargs: device is not None)
    torch.Tensor.to = counted("uploads", move, lambda self, *args, **kwargs: torch.device(engine.device) in (*args, kwargs.get("device")))
    torch.Tensor.cpu = counted("downloads", download, lambda self, *args, **kwargs: True)
    try:
        for seed in range(batch):
            engine.start(prompt(model.config, 1000, seed))
        engine.step()  # prefills and starts them all, and runs their first frame
        start = dict(calls)
        calls.clear()
        engine.step()
    finally:
        torch.tensor, torch.Tensor.to, torch.Tensor.cpu = make, move, download
    return {"uploads": calls["uploads"], "downloads": calls["downloads"], "total": calls.total(), "starting_step": start}


def explain(graphs: FrameGraphs, batch: int, position: int) -> dict[str, float | int]:
    step = running_step(graphs, batch, position)
    began = time.perf_counter()
    with torch.inference_mode():
        result = torch._dynamo.explain(graphs._frame)(step)
    return {"graphs": result.graph_count, "graph_breaks": result.graph_break_count, "explain_s": time.perf_counter() - began}


# Events inside a compiled graph's call that launch no kernel.
NOT_KERNELS = ("aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::reshape", "aten::resize_")


def is_view(name: str) -> bool:
    """Whether the aten op an event names ("aten::select") is a view, which launches nothing."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"))
    return getattr(packet, packet.overloads()[0]).is_view


def compiled_kernels(graphs: FrameGraphs, batch: int, position: int) -> dict:
    """Compile the model's hot path, run one frame of the fixed-shape step to compile it (timed),
    then count the kernels of one more frame: see the module's docstring."""
    import torch._inductor.config as inductor_config

    step = running_step(graphs, batch, position)
    with inductor_config.patch({"cpp.enable_kernel_profile": True}), torch.inference_mode():
        compile_hot_path(graphs.model)
        began = time.perf_counter()
        graphs._frame(step)
        compile_s = time.perf_counter() - began
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            graphs._frame(step)
    kinds: Counter[str] = Counter()
    graph_calls = 0
    for event in profile.events():
        parent = event.cpu_parent
        if event.name.startswith("## Call CompiledFxGraph"):
            graph_calls += 1
        elif parent is not None and parent.name.startswith("## Call CompiledFxGraph") and event.name not in NOT_KERNELS:
            kinds["generated (inductor)" if "_cpp_" in event.name else event.name] += 1
        elif parent is None and event.name.startswith("aten::") and not is_view(event.name):
            kinds[f"eager, between the graphs: {event.name}"] += 1
    return {
        "compiled_kernels_per_frame": kinds.total(),
        "compiled_kernels_by_kind": dict(kinds.most_common()),
        "compiled_graph_calls_per_frame": graph_calls,
        "compile_s": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows of the batch bucket")
    parser.add_argument("--position", type=int, default=100, help="every stream's position, for the attention's reads")
    parser.add_argument("--no-explain", action="store_true", help="skip torch._dynamo.explain")
    parser.add_argument("--no-compile", action="store_true", help="skip compiling the hot path and counting its kernels")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = narrow_config()
    torch.manual_seed(0)
    model = CSM(config).eval()
    model.setup_caches(args.batch)
    graphs = FrameGraphs(model, args.batch, capture=False)
    counter = count_frame_ops(graphs, args.batch, args.position)
    reads = kv_positions_read(graphs, args.batch, args.position)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "config": {"backbone": dataclasses.asdict(config.backbone), "decoder": dataclasses.asdict(config.decoder)},
        "batch": args.batch,
        "eager_ops_per_frame": sum(counter.by_part.values()),
        "eager_ops_by_part": dict(counter.by_part),
        "eager_ops_by_kind": dict(counter.ops.most_common(15)),
        "attention_calls_per_frame": len(reads),
        "kv_positions_read_per_slot": {
            "position": args.position,
            "backbone": max(reads[: config.backbone.num_layers]),
            "decoder": max(reads[config.backbone.num_layers :]),
        },
        "host_device_copies_per_frame": host_device_copies(model, args.batch),
    }
    if not args.no_explain:
        logger.info("torch._dynamo.explain of the frame step (slow: it traces all 31 decoder steps)")
        results.update(explain(graphs, args.batch, args.position))
    if not args.no_compile:  # last: the eager counts above are of the uncompiled step
        logger.info("compiling the hot path (the first frame) and counting the compiled frame's kernels")
        results.update(compiled_kernels(graphs, args.batch, args.position))
    shown = (
        "eager_ops_per_frame",
        "eager_ops_by_part",
        "attention_calls_per_frame",
        "kv_positions_read_per_slot",
        "host_device_copies_per_frame",
        "compiled_kernels_per_frame",
        "compiled_kernels_by_kind",
        "compiled_graph_calls_per_frame",
        "compile_s",
    )
    for key in (key for key in shown if key in results):
        print(f"{key}: {results[key]}")
    if "graphs" in results:
        print(f"graphs: {results['graphs']}, graph_breaks: {results['graph_breaks']} (explain took {results['explain_s']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
