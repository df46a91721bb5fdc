"""Quantized CSM (model/quantize.py, python -m export quantize): each scheme's layers, its fidelity
against the unquantized model on identical weights (teacher-forced, tests/fidelity.py) within
stated bounds, batched equal to alone, compiled equal to eager, and the int8 checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_engine import BUCKET_ARRIVALS, bucket_schedule, requests, run

from csm_triton import GenerationRequest, load_csm_1b
from csm_triton.model import checkpoint
from csm_triton.model.quantize import ACTIVATION_LEVELS, KEPT, CpuLinear, Int8Linear, int8_weight
from export.__main__ import main as export_main
from export.quantize import quantize_staged
from fidelity import measure, teacher_forced_logits
from prompts import conformance_prompts, our_greedy

pytestmark = pytest.mark.engine

FRAMES = 8
# Teacher-forced bounds against the unquantized tiny model on the conformance prompts (measured:
# bf16 cosine >= 0.99994, KL <= 5e-7; int8 cosine >= 0.9995, KL <= 5e-6; top-1 0.96-0.99 on both).
# Random weights give near-flat logits: KL is small because both distributions are near uniform and
# top-1 flips easily because the margins are tiny (docs/benchmarks.md, "Quantized CSM").
BOUNDS = {
    "bf16": {"cosine_min": 0.9999, "kl_mean": 2e-6, "top1_mean": 0.9},
    "int8": {"cosine_min": 0.999, "kl_mean": 2e-5, "top1_mean": 0.9},
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    return checkpoint.load_model(checkpoint.resolve(tiny_model_dir), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Not smoothed: its int8 layers are those that quantizing at load makes."""
    return quantize_staged(tiny_model_dir, tmp_path_factory.mktemp("int8") / "tiny-int8", smoothing=False)


def test_int8_weights_scale_each_output_channel_alone() -> None:
    """A channel a hundred times larger than the others keeps its own scale: the others lose no
    more than half of their own step."""
    weight = torch.randn(64, 256) * 0.02
    weight[7] *= 100
    quantized, scale = int8_weight(weight)
    assert quantized.dtype == torch.int8 and scale.shape == (64,)
    error = (quantized.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert scale[7] > 50 * scale[torch.arange(64) != 7].max()


def test_int8_linear_is_close_and_each_row_independent_of_its_batch() -> None:
    weight = torch.randn(96, 192) * 0.02
    layer = Int8Linear.from_float(weight)
    x = torch.randn(6, 3, 192) * torch.logspace(-2, 2, 6)[:, None, None]  # rows of very different sizes
    with torch.inference_mode():
        batched = layer(x)
        for row in range(6):
            assert torch.equal(layer(x[row : row + 1]), batched[row : row + 1])
    cosine = F.cosine_similarity(batched.flatten(1), (x @ weight.T).flatten(1), dim=1)
    assert (cosine > 0.999).all(), cosine
    assert ACTIVATION_LEVELS in (63, 127)


def test_every_scheme_swaps_all_but_the_kept_layers(tiny_model_dir: Path) -> None:
    paths = checkpoint.resolve(tiny_model_dir)
    for scheme, kind in (("bf16", CpuLinear), ("int8", Int8Linear)):
        model = checkpoint.load_model(paths, torch.device("cpu"), torch.float32, scheme)
        swapped = {name for name, module in model.named_modules() if isinstance(module, kind)}
        linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        assert swapped and linears == set(KEPT), (scheme, linears)  # the tiny head stays an nn.Linear: below the packing size
        assert "backbone.layers.0.mlp.w13" in swapped and "projection" in swapped


def test_unavailable_schemes_are_refused_naming_quantize(tiny_model_dir: Path, int8_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"quantize: 'fp8' is not available on cpu"):
        load_csm_1b(tiny_model_dir, device="cpu", quantize="fp8")
    with pytest.raises(ValueError, match=r"quantize: .*model.int8.safetensors holds int8 weights for the CPU only"):
        load_csm_1b(int8_dir, device="cpu", quantize="none")


def test_teacher_forcing_reproduces_the_models_own_greedy_codes(reference) -> None:
    """The fidelity measure's teacher-forced logits are the generation's: their argmax is the
    greedy codes they were forced with."""
    for tokens, mask in conformance_prompts(reference.config.text_vocab_size).values():
        _, codes = our_greedy(reference, tokens, mask, FRAMES)
        assert torch.equal(teacher_forced_logits(reference, tokens, mask, codes).argmax(-1), codes)


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_teacher_forced_logits_stay_within_bounds(tiny_model_dir: Path, reference, scheme: str) -> None:
    candidate = checkpoint.load_model(checkpoint.resolve(tiny_model_dir), torch.device("cpu"), torch.float32, scheme)
    summary = measure(reference, candidate, conformance_prompts(reference.config.text_vocab_size), FRAMES).summary()
    bounds = BOUNDS[scheme]
    assert summary["cosine_min"] >= bounds["cosine_min"], summary
    assert summary["kl_mean"] <= bounds["kl_mean"], summary
    assert summary["top1_mean"] >= bounds["top1_mean"], summary


def test_export_quantize_command_stages_a_directory_and_refuses_clearly(
    tiny_model_dir: Path, int8_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert export_main(["quantize", "--model", str(int8_dir), "--out", str(tmp_path / "again")]) == 1
    assert "already int8; quantize a directory with the unquantized weights" in caplog.text and not (tmp_path / "again").exists()
    assert export_main(["quantize", "--model", str(tiny_model_dir), "--out", str(int8_dir)]) == 1
    assert f"{int8_dir} already exists" in caplog.text
    out = tmp_path / "cli"
    assert export_main(["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--no-smoothing"]) == 0
    files = json.loads((out / checkpoint.MANIFEST_FILE).read_text())["files"]
    source = files[checkpoint.INT8_WEIGHTS_FILE]["source"]
    assert source["quantized_from"]["sha256"] == hashlib.sha256((tiny_model_dir / checkpoint.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert source["smoothing_alpha"] is None and source["kept"] == list(KEPT)
    assert files[checkpoint.MIMI_FILE]["sha256"] == hashlib.sha256((tiny_model_dir / checkpoint.MIMI_FILE).read_bytes()).hexdigest()


def test_int8_checkpoint_holds_sesame_names_and_loads_as_quantizing_at_load(tiny_model_dir: Path, int8_dir: Path) -> None:
    assert sorted(p.name for p in int8_dir.iterdir()) == [
        "config.json",
        "manifest.json",
        "mimi.safetensors",
        "model.int8.safetensors",
        "tokenizer.json",
    ]
    state = load_file(int8_dir / checkpoint.INT8_WEIGHTS_FILE)
    source = load_file(tiny_model_dir / checkpoint.WEIGHTS_FILE)
    assert {name for name in state if not name.endswith(".weight_scale")} == set(source)
    assert state["backbone.layers.0.attn.q_proj.weight"].dtype == torch.int8
    assert state["backbone.layers.0.attn.q_proj.weight_scale"].shape == (source["backbone.layers.0.attn.q_proj.weight"].shape[0],)
    assert state["codebook0_head.weight"].dtype == torch.float32  # kept
    at_load = load_csm_1b(tiny_model_dir, device="cpu", slots=2, quantize="int8")
    staged = load_csm_1b(int8_dir, device="cpu", slots=2)  # "auto": what the directory holds
    try:
        asks = [GenerationRequest("Loaded once, quantized once.", 0, topk=50, max_audio_length_ms=800, seed=5)]
        assert torch.equal(staged.generate_codes_batch(asks)[0], at_load.generate_codes_batch(asks)[0])
    finally:
        at_load.close()
        staged.close()


def outlier_model(tiny_model_dir: Path, out: Path, channel: int = 5, factor: float = 60.0) -> Path:
    """The tiny model with what trained Llamas have and random weights lack: one activation channel
    many times larger than the rest, made by scaling that channel of every norm feeding a layer."""
    shutil.copytree(tiny_model_dir, out)
    state = load_file(tiny_model_dir / checkpoint.WEIGHTS_FILE)
    for name in state:
        if name.endswith(("sa_norm.scale", "mlp_norm.scale")):
            state[name][channel] *= factor
    save_file(state, out / checkpoint.WEIGHTS_FILE)
    return out


def test_smoothing_keeps_an_outlier_channel_from_setting_every_rows_scale(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Without smoothing, the outlier channel sets each row's int8 scale and the other channels keep
    a few levels; `python -m export quantize` moves half its range into the weights first. Measured
    against the unquantized outlier model: mean cosine 0.99708 -> 0.99904, KL 7.7e-5 -> 2.5e-5,
    top-1 0.86 -> 0.94 (without the outlier: 0.99983, 4.3e-6, 0.96)."""
    model_dir = outlier_model(tiny_model_dir, tmp_path / "outlier")
    reference = checkpoint.load_model(checkpoint.resolve(model_dir), torch.device("cpu"), torch.float32)
    prompts = conformance_prompts(reference.config.text_vocab_size)
    summaries = {}
    for smoothing in (False, True):
        staged = quantize_staged(model_dir, tmp_path / f"int8-{smoothing}", smoothing=smoothing)
        candidate = checkpoint.load_model(checkpoint.resolve(staged), torch.device("cpu"), torch.float32, "int8")
        summaries[smoothing] = measure(reference, candidate, prompts, FRAMES).summary()
    plain, smoothed = summaries[False], summaries[True]
    assert smoothed["kl_mean"] < plain["kl_mean"] / 2, (plain, smoothed)
    assert smoothed["cosine_mean"] > plain["cosine_mean"] and smoothed["top1_mean"] > plain["top1_mean"], (plain, smoothed)


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_batched_equals_alone(tiny_model_dir: Path, scheme: str) -> None:
    """Requests joining and leaving a running batch give the codes each gives alone, for the same seeds."""
    generator = load_csm_1b(tiny_model_dir, device="cpu", slots=4, quantize=scheme)
    try:
        batch = requests(generator, topk=50)
        together = run(generator.engine, bucket_schedule(batch))
        alone = [next(iter(run(generator.engine, {0: [stream]}).values())) for stream in batch]
        for (_, which), codes in zip(BUCKET_ARRIVALS, together.values(), strict=True):
            assert torch.equal(codes, alone[which])
    finally:
        generator.close()


def test_int8_frame_step_compiles_with_the_quantized_layers_inside(tiny_model_dir: Path) -> None:
    """The CPU's compiled fixed-shape frame step: the int8 layers run inside the compiled graphs
    (csm::packed_linear), every bucket compiled at load, and requests joining and leaving the batch
    get the codes each gets alone on the same path. (Not always the eager path's: fused kernels
    round fp32 differently, and an activation's rounding to an integer can magnify that.)"""
    generator = load_csm_1b(tiny_model_dir, device="cpu", slots=4, quantize="int8", compile=True)
    try:
        engine = generator.engine
        assert engine.graphs is not None and not engine.graphs.capture and engine.model.compiled
        warmed = len(engine.graphs._steps)
        assert warmed == len(engine.graphs.batch_buckets) * len(engine.graphs.topk_buckets) * len(engine.graphs.length_buckets)
        batch = requests(generator, topk=50)
        with torch.profiler.profile() as profile:
            together = run(engine, bucket_schedule(batch))
        assert len(engine.graphs._steps) == warmed and {key[0] for key in engine.graphs.runs} == {1, 2, 4}
        names = {event.name for event in profile.events()}
        assert "csm::packed_linear" in names and any("CompiledFxGraph" in name for name in names)
        alone = [next(iter(run(engine, {0: [stream]}).values())) for stream in batch]
        for (_, which), codes in zip(BUCKET_ARRIVALS, together.values(), strict=True):
            assert torch.equal(codes, alone[which])
    finally:
        generator.close()


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_cuda_schemes_compile_capture_and_stay_close(tiny_model_dir: Path, scheme: str) -> None:
    """On a GPU: torchao's int8 weight-only or fp8 layers inside the compiled, captured frame step;
    the codes batched equal alone, and the logits close to bf16's."""
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9 or later")
    paths = checkpoint.resolve(tiny_model_dir)
    reference = checkpoint.load_model(paths, torch.device("cuda"), torch.bfloat16)
    candidate = checkpoint.load_model(paths, torch.device("cuda"), torch.bfloat16, scheme)
    prompts = {name: (tokens.cuda(), mask.cuda()) for name, (tokens, mask) in conformance_prompts(reference.config.text_vocab_size).items()}
    summary = measure(reference, candidate, prompts, FRAMES).summary()
    assert summary["cosine_min"] >= 0.99, summary
    generator = load_csm_1b(tiny_model_dir, device="cuda", slots=4, quantize=scheme)
    try:
        assert generator.engine.graphs.capture and generator.engine.model.compiled
        asks = [GenerationRequest(f"On the GPU, {scheme}, {i}.", i % 2, topk=50, max_audio_length_ms=640, seed=i) for i in range(3)]
        together = generator.generate_codes_batch(asks)
        for ask, codes in zip(asks, together, strict=True):
            assert torch.equal(generator.generate_codes_batch([ask])[0], codes)
    finally:
        generator.close()
