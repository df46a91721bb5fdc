"""Write a staged model directory atomically, with a manifest of every file's sha256, size and source.

Files go into a temporary directory beside the target, which is renamed into place only after the
last file and the manifest are written: a failed or interrupted export never leaves a directory
that looks staged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from csm_triton.model.checkpoint import MANIFEST_FILE

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_CHUNK = 16 << 20


def _progress(total: int, description: str) -> tqdm:
    # disable=None: bars on a terminal, silent in logs and tests.
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file, _progress(path.stat().st_size, f"sha256 {path.name}") as bar:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def cast_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors to `dtype`; integer tensors are left as they are."""
    return {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in tqdm(state.items(), desc=f"cast to {dtype}", unit="tensor", disable=None)
    }


def needs_cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> bool:
    return dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in state.values())


class StagedDir:
    """`with StagedDir(out) as staged: staged.copy(...)`: files land in `out` only if the block succeeds."""

    def __init__(self, out: str | Path, *, created_by: str, force: bool = False) -> None:
        self.out = Path(out).absolute()
        self.created_by = created_by
        self.force = force
        self.files: dict[str, dict[str, Any]] = {}
        self._check_target()

    def _check_target(self) -> None:
        if self.out.exists() and not self.force and (not self.out.is_dir() or any(self.out.iterdir())):
            raise FileExistsError(f"{self.out} already exists; remove it, choose another --out, or pass --force to replace it")

    def __enter__(self) -> StagedDir:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".staging", dir=self.out.parent))
        self.path.chmod(0o755)  # mkdtemp's 0700 would make the staged directory private
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self._write_manifest()
            self._move_into_place()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        logger.info("staged %s", self.out)

    def _record(self, name: str, source: dict[str, Any], sha256: str | None = None) -> Path:
        path = self.path / name
        self.files[name] = {"sha256": sha256 or sha256_file(path), "size": path.stat().st_size, "source": source}
        return path

    def copy(self, name: str, src: Path, source: dict[str, Any]) -> Path:
        """Copy `src` byte for byte, hashing on the way."""
        digest = hashlib.sha256()
        with open(src, "rb") as reader, open(self.path / name, "wb") as writer, _progress(src.stat().st_size, f"copy {name}") as bar:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                writer.write(chunk)
                bar.update(len(chunk))
        return self._record(name, source, digest.hexdigest())

    def write_json(self, name: str, value: Any, source: dict[str, Any]) -> Path:
        (self.path / name).write_text(json.dumps(value, indent=2) + "\n")
        return self._record(name, source)

    def write_tensors(self, name: str, state: dict[str, torch.Tensor], source: dict[str, Any]) -> Path:
        logger.info("writing %s (%d tensors)", name, len(state))
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, self.path / name)
        return self._record(name, source)

    def stage_tensors(
        self, name: str, src: Path, state: dict[str, torch.Tensor], dtype: torch.dtype | None, source: dict[str, Any]
    ) -> Path:
        """A safetensors source that needs no cast is copied verbatim (its sha256 stays the published
        one); anything else is written from `state`, cast to `dtype` where given."""
        if src.suffix == ".safetensors" and not needs_cast(state, dtype):
            return self.copy(name, src, source)
        if needs_cast(state, dtype):
            state = cast_tensors(state, dtype)
            source = {**source, "cast_to": str(dtype).removeprefix("torch.")}
        return self.write_tensors(name, state, source)

    def _write_manifest(self) -> None:
        manifest = {"created_by": self.created_by, "files": dict(sorted(self.files.items()))}
        (self.path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    def _move_into_place(self) -> None:
        self._check_target()
        if not self.out.exists() or (self.out.is_dir() and not any(self.out.iterdir())):
            os.replace(self.path, self.out)  # rename(2) also replaces an empty directory
            return
        # --force over a staged directory: move the old one aside, rename, then delete it.
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent))
        os.replace(self.out, old / self.out.name)
        os.replace(self.path, self.out)
        shutil.rmtree(old)
