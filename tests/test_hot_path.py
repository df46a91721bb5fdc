"""The GPU hot path's model side, on the CPU: compiled pieces (`compile_hot_path`) give the
transformers port's greedy codes and the eager sampled codes; fused projections keep the
checkpoint's names and are still swapped for packed CPU kernels, which compile too; the sampler's
constant table is built once.

One compiled model for the module (batch 1, top-k bucket 64), so each piece compiles once.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_conformance import FRAMES, assert_same_frames, prompts, random_pair  # noqa: F401 (fixtures)
from test_engine import run_logged
from torch.utils._python_dispatch import TorchDispatchMode

from csm_triton.engine.engine import Engine
from csm_triton.engine.stream import Stream
from csm_triton.model.checkpoint import read_state_dict
from csm_triton.model.config import TINY, ModelConfig
from csm_triton.model.model import CSM, compile_hot_path
from csm_triton.model.quantize import CpuLinear, quantize
from csm_triton.model.sampling import Sampler, token_hashes
from hf_reference import hf_generate

pytestmark = pytest.mark.engine

MAX_TOPK = 64


def sampler(topk: int, seed: int, frame: int) -> Sampler:
    return Sampler(torch.full((1,), 0.9), torch.full((1,), topk), torch.full((1,), seed), torch.full((1,), frame), 32, MAX_TOPK)


CALLS: Counter[str] = Counter()  # calls of each compiled piece


@pytest.fixture(scope="module")
def compiled(random_pair) -> CSM:  # noqa: F811
    model, _ = random_pair
    model.setup_caches(1)  # the depth decoder's cache, which sample_frame writes
    compile_hot_path(model)
    pieces = model._compiled
    compile_hot_path(model)  # idempotent
    assert model._compiled is pieces
    for name, piece in vars(pieces).items():
        setattr(pieces, name, lambda *args, name=name, piece=piece: CALLS.update([name]) or piece(*args))
    return model


@torch.inference_mode()
def compiled_greedy(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, frames: int) -> torch.Tensor:
    """Eager prefill, then `frames` greedy frames through the fixed-shape step the way
    FrameGraphs runs it (one position, rows as a count, all max_seq_len positions): [frames, 32]."""
    model.setup_caches(1)
    max_seq_len = model.config.backbone.max_seq_len
    length = tokens.shape[0]
    hidden = model.backbone_forward(tokens[None], mask[None], 1, torch.arange(length)[None], length)[:, -1]
    hidden = hidden.clone(memory_format=torch.contiguous_format)  # the strides of the frames' hidden states
    frame_mask = torch.ones(1, 1, 33, dtype=torch.bool)
    frame_mask[..., -1] = False
    codes = []
    for frame in range(frames):
        codes.append(model.sample_frame(hidden, sampler(topk=1, seed=0, frame=frame))[0])
        frame_tokens = torch.cat([codes[-1], torch.zeros(1, dtype=torch.long)])[None, None]
        hidden = model.backbone_forward(frame_tokens, frame_mask, 1, torch.tensor([[length + frame]]), max_seq_len)[:, 0]
    return torch.stack(codes)


@pytest.mark.parametrize("prompt", ["text", "audio"])
def test_compiled_greedy_frames_match_hf(compiled, random_pair, prompts, prompt):  # noqa: F811
    tokens, mask = prompts[prompt]
    CALLS.clear()
    with torch._dynamo.config.patch(error_on_recompile=prompt == "audio"):  # the text prompt compiled every piece
        ours = compiled_greedy(compiled, tokens, mask, FRAMES)
    assert CALLS == {"backbone": FRAMES, "_first_decoder_step": FRAMES, "_decoder_step": FRAMES * 30}
    assert_same_frames(ours, hf_generate(random_pair[1], tokens, mask, FRAMES))


def test_compiled_sample_frame_gives_the_eager_codes(compiled):
    CALLS.clear()
    # Made in inference mode like the backbone's hidden states: the pieces compiled for those serve.
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        hidden = torch.randn(6, 1, compiled.config.backbone.embed_dim, generator=torch.Generator().manual_seed(3))
        for frame, h in enumerate(hidden):
            codes = compiled.sample_frame(h, sampler(topk=50, seed=frame * 1000 + 7, frame=frame))
            eager_sampler = sampler(topk=50, seed=frame * 1000 + 7, frame=frame)
            # Any callable other than a Sampler runs the same steps eagerly.
            eager = compiled.sample_frame(h, lambda logits, codebook: eager_sampler(logits, codebook))  # noqa: B023
            assert torch.equal(codes, eager), (frame, codes, eager)
            assert len(codes.unique()) > 8  # sampled, not collapsed to one code
    assert CALLS["_decoder_step"] == 6 * 30  # the compiled runs only: the eager ones bypass them


def test_fused_projections_keep_the_checkpoint_names(tiny_model_dir, tmp_path):
    state = read_state_dict(tiny_model_dir / "model.safetensors")
    config = ModelConfig.from_json(tiny_model_dir / "config.json")
    with torch.device("meta"):
        model = CSM(config)
    model.load_state_dict(state, assign=True)
    layer = model.decoder.layers[1]
    assert not hasattr(layer.attn, "q_proj") and not hasattr(layer.mlp, "w1")
    assert torch.equal(layer.mlp.w13.weight, torch.cat([state["decoder.layers.1.mlp.w1.weight"], state["decoder.layers.1.mlp.w3.weight"]]))
    saved = model.state_dict()
    assert sorted(saved) == sorted(state)
    assert all(torch.equal(saved[name], state[name]) for name in state)
    save_file(saved, tmp_path / "again.safetensors")  # no two tensors share memory
    fresh = CSM(config)
    fresh.load_state_dict(load_file(tmp_path / "again.safetensors"))  # strict
    assert all(torch.equal(tensor, state[name]) for name, tensor in fresh.state_dict().items())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built in")
def test_packed_cpu_layers_replace_the_fused_projections_and_compile(random_pair, prompts):  # noqa: F811
    """Packed oneDNN weights cannot enter a graph; the compiled pieces call them through the
    csm::packed_linear op and still give the port's greedy codes."""
    model = CSM(TINY).eval()  # not a deep copy: the module's `compiled` fixture compiled the pair's model
    model.load_state_dict(random_pair[0].state_dict())
    quantize(model, "none", torch.device("cpu"), min_weight_elements=0)
    layer = model.backbone.layers[0]
    assert isinstance(layer.attn.qkv_proj, CpuLinear) and isinstance(layer.mlp.w13, CpuLinear)
    compile_hot_path(model)
    tokens, mask = prompts["text"]
    assert_same_frames(compiled_greedy(model, tokens, mask, FRAMES), hf_generate(random_pair[1], tokens, mask, FRAMES))


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_the_noise_table_is_built_once():
    token_hashes.cache_clear()
    logits = torch.randn(3, 2051, generator=torch.Generator().manual_seed(0))
    first, second = sampler(topk=50, seed=1, frame=0), sampler(topk=50, seed=2, frame=1)
    with Ops() as ops:
        for codebook in range(32):
            first(logits[:1], codebook)
        second(logits[:1], 0)
    assert token_hashes.cache_info().misses == 1  # one table for this vocabulary and device
    assert "aten.arange" not in ops.names  # the table's first op


def test_the_compiled_frame_step_gives_the_eager_codes(prompts):  # noqa: F811
    """Engine(frame_graphs=True, compile=True), as CUDA runs it but uncaptured: streams joining,
    one cancelled (the busy slots compacted), batch and length buckets changing under symbolic
    shapes, against the eager dynamic path on the same weights."""
    torch.manual_seed(4321)
    model = CSM(TINY).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith(".scale") else 0.0, 0.1 if name.endswith(".scale") else 0.02)
    eager = copy.deepcopy(model)
    (text, text_mask), (audio, audio_mask) = prompts["text"], prompts["audio"]
    batch = [
        Stream(tokens, mask, frames, 0.9, 50, seed)
        for tokens, mask, frames, seed in ((text, text_mask, 9, 1), (audio, audio_mask, 7, 2), (text[:5], text_mask[:5], 12, 3))
    ]
    arrivals, cancels = {0: batch[:2], 2: batch[2:]}, {4: 1}
    expected, _ = run_logged(Engine(eager, 4, frame_graphs=False), arrivals, cancels)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine = Engine(model, 4, frame_graphs=True, compile=True)
    got, buckets = run_logged(engine, arrivals, cancels)
    assert model.compiled and {bucket[0] for bucket in buckets if bucket} == {1, 2, 4}
    assert {bucket[2] for bucket in buckets if bucket} == {64, 512}
    # Every bucket is compiled at load: batch 1 and the others for each of the 3 pieces, and the
    # backbone's whole-cache length bucket (its slice is the whole cache) for both batch graphs.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 8
    for want, have in zip(expected, got, strict=True):
        assert len(want) > 0 and torch.equal(want, have)
