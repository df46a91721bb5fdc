"""`python -m export quantize`: a staged directory whose linear layers are int8, written once, so
that a small device downloads and loads about a quarter of the linear layers' bytes and loads
them without quantizing (model/quantize.py says which layers and how).

The new directory holds `model.int8.safetensors` (Sesame's key names; each int8 layer's `weight`
in int8 beside its per-channel `weight_scale`; every other tensor as the source has it, or cast
by `--dtype`) and the source's config, tokenizer and Mimi, copied byte for byte.

Outliers: trained Llamas have a few activation channels many times larger than the rest, and with
one int8 scale a row, such a channel would leave the others a few levels each. Before quantizing,
`smooth` moves that range into the weights, as SmoothQuant does, for the layers a norm feeds
(attention's q/k/v after sa_norm, the MLP's w1/w3 after mlp_norm): it runs the unquantized model
over calibration lines, and divides channel j of the norm's scale by s_j = max|X_j|^a /
max|W_j|^(1-a) while multiplying column j of the weights by it. The float model is unchanged; the
int8 one no longer lets one channel set the scale of every row.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from csm_triton import Segment, load_csm_1b
from csm_triton.model import checkpoint
from csm_triton.model.config import ModelConfig
from csm_triton.model.quantize import KEPT, SCALE_SUFFIX, int8_weight

from .staging import StagedDir, sha256_file

logger = logging.getLogger(__name__)

SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: half of an outlier's range moves into the weights
# Calibration: each line spoken after the ones before it (text, and the previous reply as audio codes).
CALIBRATION_LINES = (
    (0, "Hello, thanks for calling. How can I help you today?"),
    (1, "Hi! I'd like to move my appointment from Tuesday to Thursday, if that's possible."),
    (0, "Of course. Would ten in the morning work, or is the afternoon better for you?"),
    (1, "Hmm... the afternoon, please. Around three?"),
    (0, "Three o'clock on Thursday it is. You'll get a text to confirm in a minute."),
    (1, "Perfect, that's all I needed. Thank you so much!"),
)
CALIBRATION_AUDIO_MS = 2000
# Sesame's names of the layers a norm feeds, by the norm: they share its output as their input.
NORM_FED = {"sa_norm": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "mlp_norm": ("mlp.w1", "mlp.w3")}


def int8_layers(config: ModelConfig) -> set[str]:
    """Sesame's names of the layers the int8 scheme stores in int8."""
    suffix = "." + SCALE_SUFFIX
    return {name.removesuffix(suffix) for name in checkpoint.expected_shapes(config, int8=True) if name.endswith(suffix)}


def int8_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`state` with every int8 layer's weight quantized per output channel (as loading with
    quantize="int8" does), the other floating-point tensors cast to `dtype` where given."""
    layers = int8_layers(config)
    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(state.items(), desc="quantize", unit="tensor", disable=None):
        layer = name.removesuffix(".weight")
        if layer in layers:
            quantized[name], quantized[f"{layer}.{SCALE_SUFFIX}"] = int8_weight(tensor)
        else:
            quantized[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return quantized


def activation_maxima(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The largest |value| of each channel of every norm that feeds a linear layer ("backbone.layers.0.sa_norm"
    -> [embed_dim]), while the unquantized model speaks the calibration lines in turn."""
    generator = load_csm_1b(model_dir, device="cpu", slots=1, quantize="none")
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            largest = output.detach().abs().flatten(0, -2).amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], largest) if name in maxima else largest

        return hook

    model = generator.engine.model
    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in NORM_FED and name.startswith(("backbone.layers.", "decoder.layers."))
    ]
    try:
        context: list[Segment] = []
        for speaker, text in tqdm(CALIBRATION_LINES, desc="calibrate", unit="line", disable=None):
            codes = generator.generate_codes(text, speaker, context[-2:], max_audio_length_ms=CALIBRATION_AUDIO_MS, seed=len(context))
            context.append(Segment(speaker, text, codes=codes.numpy().astype("int32")))
    finally:
        for hook in hooks:
            hook.remove()
        generator.close()
    return maxima


def smooth(state: dict[str, torch.Tensor], maxima: dict[str, torch.Tensor], alpha: float = SMOOTHING_ALPHA) -> dict[str, torch.Tensor]:
    """`state` with each calibrated norm's scale divided by s and the columns of the layers it feeds
    multiplied by it (s_j = max|X_j|^alpha / max|W_j|^(1-alpha)): the same float model."""
    smoothed = dict(state)
    for norm, largest in maxima.items():
        prefix, _, kind = norm.rpartition(".")
        layers = [f"{prefix}.{layer}.weight" for layer in NORM_FED[kind]]
        weight_max = torch.stack([state[name].float().abs().amax(dim=0) for name in layers]).amax(dim=0)
        factor = (largest.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        scale = f"{norm}.scale"
        smoothed[scale] = (state[scale].float() / factor).to(state[scale].dtype)
        for name in layers:
            smoothed[name] = (state[name].float() * factor).to(state[name].dtype)
    return smoothed


def quantize_staged(
    model_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None, force: bool = False, smoothing: bool = True
) -> Path:
    """Stage `out` from the staged `model_dir` with int8 linear layers, smoothed first (`smooth`)
    unless `smoothing` is False."""
    paths = checkpoint.resolve(model_dir)
    if paths.default_scheme() != "none":
        raise ValueError(f"{paths.weights}: already int8; quantize a directory with the unquantized weights")
    config = ModelConfig.from_json(paths.config)
    state = checkpoint.read_state_dict(paths.weights)
    checkpoint.check_state_dict(state, config, paths.weights)
    staged = StagedDir(out, created_by="python -m export quantize", force=force)
    if smoothing:
        state = smooth(state, activation_maxima(model_dir))
    source = {
        "quantized_from": {"path": str(paths.weights), "sha256": sha256_file(paths.weights)},
        "scheme": "int8 per output channel, symmetric",
        "smoothing_alpha": SMOOTHING_ALPHA if smoothing else None,
        "kept": list(KEPT),
        **({"cast_to": str(dtype).removeprefix("torch.")} if dtype is not None else {}),
    }
    with staged:
        for name, path in (
            (checkpoint.CONFIG_FILE, paths.config),
            (checkpoint.TOKENIZER_FILE, paths.tokenizer),
            (checkpoint.MIMI_FILE, paths.mimi),
        ):
            staged.copy(name, path, {"path": str(path)})
        staged.write_tensors(checkpoint.INT8_WEIGHTS_FILE, int8_state_dict(state, config, dtype), source)
    return staged.out
