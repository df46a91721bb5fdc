"""Fidelity of each quantization scheme (model/quantize.py) against the unquantized model on identical
weights: per codebook, the teacher-forced logits' cosine similarity, KL divergence and top-1
agreement, and the greedy codes frame by frame, on the conformance prompts (text alone, and text
with two turns of audio context) (tests/fidelity.py).

  tiny: the `export tiny` model (fp32 reference).
  1b:   the real 1B + 100M architecture with random weights (fp32 reference).
  real: the staged CSM-1B (--model-dir, default models/csm-1b), when it is staged; says so when not.

Random weights have no outlier channels, unlike a trained Llama, and their logits are nearly flat:
KL comes out small because both distributions are near uniform, and top-1 and greedy agreement
come out low because a near-tie flips at the smallest error. On real weights the margins are
wide and the outliers are there: the real part is the figure that counts.

Usage: python bench/fidelity.py [--part tiny,1b,real] [--schemes bf16,int8] [--frames N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from csm_triton.model import checkpoint
from csm_triton.model.config import CSM_1B
from csm_triton.model.quantize import quantize
from export.tiny import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gpu_bench import random_model  # noqa: E402  (beside this script)

from fidelity import measure  # noqa: E402  (the measure the tests bound)
from prompts import conformance_prompts  # noqa: E402


def staged(model_dir: Path, scheme: str) -> torch.nn.Module:
    return checkpoint.load_model(checkpoint.resolve(model_dir), torch.device("cpu"), torch.float32, scheme)


def random_1b(scheme: str) -> torch.nn.Module:
    model = random_model(CSM_1B, torch.device("cpu"), torch.float32)  # the same weights each time (seed 0)
    quantize(model, scheme, torch.device("cpu"))
    return model


def run_part(name: str, load: Callable[[str], torch.nn.Module], schemes: list[str], frames: int) -> dict:
    """Each scheme against the unquantized model, one candidate in memory at a time."""
    reference, results = load("none"), {}
    prompts = conformance_prompts(reference.config.text_vocab_size)
    for scheme in tqdm(schemes, desc=name, leave=False):
        candidate = load(scheme)
        results[scheme] = measure(reference, candidate, prompts, frames).summary()
        del candidate
        print(
            f"{name} {scheme}: " + json.dumps({key: value for key, value in results[scheme].items() if key != "per_codebook"}), flush=True
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="tiny,1b,real", help="comma-separated: tiny, 1b, real")
    parser.add_argument("--schemes", default="bf16,int8", help="comma-separated CPU schemes")
    parser.add_argument("--frames", type=int, default=8, help="greedy frames a prompt (teacher-forced over the same)")
    parser.add_argument("--model-dir", type=Path, default=Path("models/csm-1b"), help="the staged real weights (part real)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    parts, schemes = args.part.split(","), args.schemes.split(",")
    results: dict = {"frames": args.frames}
    with tempfile.TemporaryDirectory() as tmp:
        if "tiny" in parts:
            tiny = make_tiny(Path(tmp) / "tiny")
            results["tiny"] = run_part("tiny", lambda scheme: staged(tiny, scheme), schemes, args.frames)
        if "1b" in parts:
            results["1b_random"] = run_part("1b", random_1b, schemes, args.frames)
    if "real" in parts:
        try:
            checkpoint.resolve(args.model_dir)
        except FileNotFoundError:
            results["real"] = f"no real weights staged in {args.model_dir}: not measured (stage them with `make export`)"
            print(results["real"])
        else:
            results["real"] = run_part("real", lambda scheme: staged(args.model_dir, scheme), schemes, args.frames)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
