"""The staged model directory, and reading, checking and loading CSM weights.

A staged directory holds `config.json`, `model.safetensors` (Sesame's original key names),
`tokenizer.json` (Llama-3.2), `mimi.safetensors` (moshi's Mimi format) and `manifest.json`.
Every checkpoint form Sesame published is absorbed here, in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import ModelConfig
from .model import CSM, use_cpu_linear

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "ckpt.pt"
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
    weights: Path
    tokenizer: Path
    mimi: Path


def resolve(ckpt_path: str | Path) -> StagedPaths:
    """A staged directory, or a `ckpt.pt` / `model.safetensors` file with the rest beside it."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory or checkpoint; {STAGE_HINT}")
    if path.is_dir():
        directory = path
        weights = directory / WEIGHTS_FILE
        if not weights.exists() and (directory / LEGACY_WEIGHTS_FILE).exists():
            weights = directory / LEGACY_WEIGHTS_FILE
    else:
        if path.suffix not in (".pt", ".safetensors"):
            raise ValueError(f"{path}: a checkpoint must be a .pt state dict or a .safetensors file")
        directory, weights = path.parent, path
    paths = StagedPaths(directory / CONFIG_FILE, weights, directory / TOKENIZER_FILE, directory / MIMI_FILE)
    for name, file in vars(paths).items():
        if not file.exists():
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


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in CSM(config).state_dict().items()}


def check_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, source: str | Path = "checkpoint") -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped tensors."""
    expected = expected_shapes(config)
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


def load_model(paths: StagedPaths, device: torch.device, dtype: torch.dtype) -> CSM:
    config = ModelConfig.from_json(paths.config)
    state = read_state_dict(paths.weights)
    check_state_dict(state, config, paths.weights)
    with torch.device("meta"):
        model = CSM(config)
    model.load_state_dict(state, assign=True)
    logger.info(
        "loaded %s (%.0fM parameters) onto %s as %s", paths.weights, sum(p.numel() for p in model.parameters()) / 1e6, device, dtype
    )
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        use_cpu_linear(model)
    return model
