"""The staged model directory, and reading, checking and loading CSM weights.

A staged directory holds `config.json`, `model.safetensors` (Sesame's original key names),
`tokenizer.json` (Llama-3.2), `mimi.safetensors` (moshi's Mimi format) and `manifest.json`; a
quantized one (`python -m export quantize`) holds `model.int8.safetensors` beside or instead of
`model.safetensors`. Every checkpoint form Sesame published is absorbed here, in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import ModelConfig
from .model import CSM
from .quantize import empty_int8_layers, quantize

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "ckpt.pt"
INT8_WEIGHTS_FILE = "model.int8.safetensors"  # int8 linear layers and their scales, the rest in bf16
TOKENIZER_FILE = "tokenizer.json"
MIMI_FILE = "mimi.safetensors"
MANIFEST_FILE = "manifest.json"

STAGE_HINT = (
    "stage a model directory with `python -m export fetch --out DIR` (real weights) "
    "or `python -m export tiny --out DIR` (a small random-weight model)"
)


@dataclass(frozen=True)
class StagedPaths:
    config: Path
    weights: Path  # the unquantized weights, or the int8 ones when a directory holds only those
    tokenizer: Path
    mimi: Path
    int8_weights: Path | None = None

    def default_scheme(self) -> str:
        """The quantization to load when none is asked for: what the directory holds."""
        return "int8" if self.weights == self.int8_weights else "none"


def resolve(ckpt_path: str | Path) -> StagedPaths:
    """A staged directory, or a `ckpt.pt` / `model.safetensors` file with the rest beside it."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory or checkpoint; {STAGE_HINT}")
    if path.is_dir():
        directory = path
        int8_weights = directory / INT8_WEIGHTS_FILE
        weights = next(
            (directory / name for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE, INT8_WEIGHTS_FILE) if (directory / name).exists()),
            directory / WEIGHTS_FILE,
        )
    else:
        if path.suffix not in (".pt", ".safetensors"):
            raise ValueError(f"{path}: a checkpoint must be a .pt state dict or a .safetensors file")
        directory, weights = path.parent, path
        int8_weights = path if path.name == INT8_WEIGHTS_FILE else directory / INT8_WEIGHTS_FILE
    int8_weights = int8_weights if int8_weights.exists() else None
    paths = StagedPaths(directory / CONFIG_FILE, weights, directory / TOKENIZER_FILE, directory / MIMI_FILE, int8_weights)
    for name, file in vars(paths).items():
        if file is not None and not file.exists():
            raise FileNotFoundError(f"{file}: the model's {name} file is missing; {STAGE_HINT}")
    return paths


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Sesame's `ckpt.pt` (a torch state dict) or `model.safetensors`, memory-mapped where possible."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def empty_model(config: ModelConfig, int8: bool = False) -> CSM:
    """The model on the meta device, ready for `load_state_dict(assign=True)`; `int8`: for an int8 checkpoint."""
    with torch.device("meta"):
        model = CSM(config)
        if int8:
            empty_int8_layers(model)
    return model


def expected_shapes(config: ModelConfig, int8: bool = False) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in empty_model(config, int8).state_dict().items()}


def check_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, source: str | Path = "checkpoint", int8: bool = False) -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped tensors."""
    expected = expected_shapes(config, int8)
    problems = [
        f"{name} has shape {list(state[name].shape)}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in state and state[name].shape != shape
    ]
    problems += [f"missing {name}" for name in expected if name not in state]
    problems += [f"unexpected {name}" for name in state if name not in expected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"{source}: weights do not match the config: {shown}")


def load_model(paths: StagedPaths, device: torch.device, dtype: torch.dtype, scheme: str = "none") -> CSM:
    """The model with its linear layers as `scheme` (model/quantize.py) runs them on `device`: from
    the int8 checkpoint when the directory has one and int8 on the CPU is asked for (no
    quantizing at load), else from the unquantized weights."""
    config = ModelConfig.from_json(paths.config)
    int8 = scheme == "int8" and device.type == "cpu" and paths.int8_weights is not None
    weights = paths.int8_weights if int8 else paths.weights
    if weights == paths.int8_weights and not int8:
        raise ValueError(
            f"quantize: {weights} holds int8 weights for the CPU only; load it with quantize='int8' on the CPU, "
            f"or stage the unquantized {WEIGHTS_FILE} beside it"
        )
    state = read_state_dict(weights)
    check_state_dict(state, config, weights, int8)
    model = empty_model(config, int8)
    model.load_state_dict(state, assign=True)
    logger.info(
        "loaded %s (%.0fM weights) onto %s as %s, linear layers %s",
        weights,
        sum(t.numel() for t in state.values()) / 1e6,
        device,
        dtype,
        scheme,
    )
    model = model.to(device=device, dtype=dtype).eval()
    quantize(model, scheme, device)
    return model
