"""`python -m export {fetch,tiny,quantize} --out DIR`: stage a model directory for the server."""

from __future__ import annotations

import argparse
import logging
import sys

from . import fetch, quantize, tiny
from .staging import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    pull = commands.add_parser("fetch", help="stage Sesame's CSM-1B, the Llama-3.2 tokenizer and Mimi from the Hugging Face Hub")
    pull.add_argument("--out", required=True, help="the staged model directory to create")
    pull.add_argument("--repo", default=fetch.DEFAULT_REPO, help="CSM weights: config.json + model.safetensors, or ckpt.pt")
    pull.add_argument("--tokenizer-repo", default=fetch.DEFAULT_TOKENIZER_REPO, help="repo holding the Llama-3.2 tokenizer.json")
    pull.add_argument("--mimi-repo", default=fetch.DEFAULT_MIMI_REPO, help="repo holding Mimi's weights")
    pull.add_argument("--revision", help="branch, tag or commit of --repo (default main)")
    pull.add_argument("--dtype", choices=sorted(DTYPES), help="cast CSM and Mimi weights (default: keep as published)")
    pull.add_argument("--from-dir", help="stage offline from files downloaded earlier, under FROM_DIR/<repo id>/ or flat in FROM_DIR/")
    pull.add_argument("--force", action="store_true", help="replace --out if it exists")

    small = commands.add_parser("tiny", help="stage a small random-weight model (tests, first runs)")
    small.add_argument("--out", required=True, help="the staged model directory to create")
    small.add_argument("--seed", type=int, default=0, help="weights are a function of the seed")
    small.add_argument(
        "--size", choices=sorted(tiny.SIZES), default="tiny", help="1b: the real 1B + 100M architecture in bf16 (3 GB), for benchmarks"
    )
    small.add_argument("--force", action="store_true", help="replace --out if it exists")

    int8 = commands.add_parser("quantize", help="stage a copy of a staged model with int8 linear layers (for the CPU)")
    int8.add_argument("--model", required=True, help="a staged model directory with the unquantized weights")
    int8.add_argument("--out", required=True, help="the staged model directory to create")
    int8.add_argument("--dtype", choices=sorted(DTYPES), help="cast the tensors kept unquantized (default: as the source has them)")
    int8.add_argument("--no-smoothing", action="store_true", help="quantize the weights as they are (no calibration run)")
    int8.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.command == "fetch":
            out = fetch.fetch(
                args.out,
                repo=args.repo,
                tokenizer_repo=args.tokenizer_repo,
                mimi_repo=args.mimi_repo,
                revision=args.revision,
                from_dir=args.from_dir,
                dtype=args.dtype,
                force=args.force,
            )
        elif args.command == "quantize":
            out = quantize.quantize_staged(
                args.model, args.out, dtype=DTYPES.get(args.dtype), force=args.force, smoothing=not args.no_smoothing
            )
        else:
            out = tiny.make_tiny(args.out, seed=args.seed, force=args.force, size=args.size)
    except (OSError, ValueError) as error:  # missing files, bad checkpoints, Hub errors (requests' are OSErrors)
        logging.getLogger("export").error("%s", error)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
