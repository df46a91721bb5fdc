"""`python -m export fetch`: find Sesame's CSM-1B weights, the Llama-3.2 tokenizer and Mimi on the
Hugging Face Hub (or among files downloaded earlier), check them, and stage them as one directory.

`sesame/csm-1b` first held only `ckpt.pt` (a torch state dict) and later `config.json` +
`model.safetensors`; both forms are staged as `model.safetensors` with the original key names.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from moshi.models import loaders
from safetensors import SafetensorError
from safetensors.torch import load_file

from csm_triton.model.checkpoint import (
    CONFIG_FILE,
    LEGACY_WEIGHTS_FILE,
    MIMI_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_state_dict,
    read_state_dict,
)
from csm_triton.model.config import CSM_1B, ModelConfig

from .staging import DTYPES, StagedDir

logger = logging.getLogger(__name__)

DEFAULT_REPO = "sesame/csm-1b"
DEFAULT_TOKENIZER_REPO = "meta-llama/Llama-3.2-1B"
DEFAULT_MIMI_REPO = "kyutai/moshiko-pytorch-bf16"


class MissingFile(FileNotFoundError):
    """A file a source does not have; the message names it and where it was looked for."""


@dataclass(frozen=True)
class Found:
    path: Path
    source: dict[str, str]  # where it came from, as the manifest records it


Locate = Callable[[str, str], Found]  # (repo id, filename) -> the file, or raises MissingFile


def hub_locator(revisions: Mapping[str, str] | None = None) -> Locate:
    """Files through huggingface_hub's cache; token, endpoint and offline mode come from the
    environment as huggingface_hub reads it. `revisions` maps a repo id to a branch, tag or commit."""
    revisions = dict(revisions or {})

    def locate(repo: str, filename: str) -> Found:
        revision = revisions.get(repo)
        try:
            path = Path(hf_hub_download(repo, filename, revision=revision))
        except EntryNotFoundError as error:  # includes LocalEntryNotFoundError: offline or unreachable, and not cached
            reason = str(error).splitlines()[0]
            raise MissingFile(f"no {filename} in {repo} at revision {revision or 'main'}: {reason}") from error
        source = {"repo": repo, "filename": filename, "revision": revision or "main"}
        if path.parent.parent.name == "snapshots":  # the cache keeps a revision's files under snapshots/<commit>/
            source["commit"] = path.parent.name
        return Found(path, source)

    return locate


def dir_locator(root: str | Path) -> Locate:
    """Files downloaded earlier: `ROOT/<repo id>/<file>` (`huggingface-cli download REPO --local-dir
    ROOT/REPO`), else flat in `ROOT/`."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory to stage from")

    def locate(repo: str, filename: str) -> Found:
        candidates = [root / repo / filename, root / filename]
        for path in candidates:
            if path.is_file():
                return Found(path, {"path": str(path)})
        raise MissingFile(f"no {filename} for {repo}: looked for {candidates[0]} and {candidates[1]}")

    return locate


@dataclass(frozen=True)
class Sources:
    config: Found | None  # None: a ckpt.pt-era repo without config.json, which is CSM-1B
    weights: Found
    tokenizer: Found
    mimi: Found


def locate_sources(
    locate: Locate, repo: str = DEFAULT_REPO, tokenizer_repo: str = DEFAULT_TOKENIZER_REPO, mimi_repo: str = DEFAULT_MIMI_REPO
) -> Sources:
    """Small files first, so that a missing one is reported before gigabytes are downloaded."""
    try:
        config = locate(repo, CONFIG_FILE)
    except MissingFile as missing:
        logger.warning("%s; assuming the CSM-1B config (backbone llama-1B, decoder llama-100M)", missing)
        config = None
    tokenizer = locate(tokenizer_repo, TOKENIZER_FILE)
    mimi = locate(mimi_repo, loaders.MIMI_NAME)
    try:
        weights = locate(repo, WEIGHTS_FILE)
    except MissingFile as missing:
        try:
            weights = locate(repo, LEGACY_WEIGHTS_FILE)
        except MissingFile as legacy_missing:
            raise MissingFile(f"no weights: {missing}; and {legacy_missing}") from legacy_missing
    return Sources(config, weights, tokenizer, mimi)


def stage(out: str | Path, sources: Sources, dtype: str | None = None, force: bool = False) -> Path:
    """Check every file (config, weights against it, tokenizer, Mimi), then stage them; `dtype`
    ('bf16' or 'fp32') casts the floating-point weights of CSM and Mimi, None keeps them."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")
    torch_dtype = DTYPES[dtype] if dtype else None
    staged = StagedDir(out, created_by="python -m export fetch", force=force)
    if sources.config is None:
        config, config_source = CSM_1B, {"generated": "CSM-1B config; the weights' source has no config.json"}
    else:
        config, config_source = ModelConfig.from_json(sources.config.path), sources.config.source
    _check_tokenizer(sources.tokenizer.path)
    weights = _read_tensors(sources.weights.path, read_state_dict)
    check_state_dict(weights, config, sources.weights.path)
    mimi = _read_tensors(sources.mimi.path, load_file)
    with staged:
        staged.write_json(CONFIG_FILE, config.to_dict(), config_source)
        staged.copy(TOKENIZER_FILE, sources.tokenizer.path, sources.tokenizer.source)
        staged.stage_tensors(MIMI_FILE, sources.mimi.path, mimi, torch_dtype, sources.mimi.source)
        _check_mimi(staged.path / MIMI_FILE, sources.mimi.path)
        staged.stage_tensors(WEIGHTS_FILE, sources.weights.path, weights, torch_dtype, sources.weights.source)
    return staged.out


def fetch(
    out: str | Path,
    *,
    repo: str = DEFAULT_REPO,
    tokenizer_repo: str = DEFAULT_TOKENIZER_REPO,
    mimi_repo: str = DEFAULT_MIMI_REPO,
    revision: str | None = None,
    from_dir: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Stage a model directory from the Hub (`revision` applies to `repo`) or from `from_dir`."""
    if from_dir is not None:
        if revision is not None:
            raise ValueError("--revision selects a Hub revision; it does not apply to --from-dir")
        locate = dir_locator(from_dir)
    else:
        locate = hub_locator({repo: revision} if revision else None)
    return stage(out, locate_sources(locate, repo, tokenizer_repo, mimi_repo), dtype, force)


def _read_tensors(path: Path, read: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    logger.info("reading %s", path)
    try:
        return read(path)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable checkpoint ({error})") from error


def _check_tokenizer(path: Path) -> None:
    try:
        tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception for unparsable files
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({error})") from error


def _check_mimi(staged: Path, source: Path) -> None:
    """The staged file must load with moshi's own loader, as the server will load it."""
    try:
        loaders.get_mimi(staged, device="cpu", num_codebooks=32)
    except RuntimeError as error:
        details = " ".join(str(error).split())  # load_state_dict's message spans lines: missing, unexpected keys
        raise ValueError(f"{source}: not a Mimi checkpoint that moshi loads: {details[:600]}") from error
