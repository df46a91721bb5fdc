"""Loading: every checkpoint form gives the same model; broken inputs give clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from csm_triton import load_csm_1b
from csm_triton.model.checkpoint import read_state_dict
from csm_triton.model.config import CSM_1B, FLAVORS, ModelConfig

pytestmark = pytest.mark.engine


def codes_of(path: Path) -> torch.Tensor:
    return load_csm_1b(path, device="cpu", slots=1).generate_codes("Same model?", 0, [], topk=1, max_audio_length_ms=320, seed=0)


def copy_without_weights(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    return target


def test_checkpoint_forms_give_the_same_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    reference = codes_of(tiny_model_dir)
    state = read_state_dict(tiny_model_dir / "model.safetensors")
    legacy = copy_without_weights(tiny_model_dir, tmp_path / "legacy")
    torch.save(state, legacy / "ckpt.pt")
    wrapped = copy_without_weights(tiny_model_dir, tmp_path / "wrapped")
    torch.save({"model": state}, wrapped / "ckpt.pt")
    for form in (legacy, legacy / "ckpt.pt", wrapped / "ckpt.pt", tiny_model_dir / "model.safetensors"):
        assert torch.equal(codes_of(form), reference), form


def test_flavor_names_and_explicit_architecture_are_the_same_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    named = shutil.copytree(tiny_model_dir, tmp_path / "named")
    values = json.loads((tiny_model_dir / "config.json").read_text())
    assert "backbone" in values and "decoder" in values
    assert values["backbone"] == dataclasses.asdict(FLAVORS["tiny-backbone"])
    named_values = {k: v for k, v in values.items() if k not in ("backbone", "decoder")}
    named_values |= {"backbone_flavor": "tiny-backbone", "decoder_flavor": "tiny-decoder"}
    (named / "config.json").write_text(json.dumps(named_values))
    assert torch.equal(codes_of(named), codes_of(tiny_model_dir))


def test_csm_1b_config_matches_the_published_architecture() -> None:
    config = ModelConfig.from_dict(
        {
            "backbone_flavor": "llama-1B",
            "decoder_flavor": "llama-100M",
            "text_vocab_size": 128256,
            "audio_vocab_size": 2051,
            "audio_num_codebooks": 32,
        }
    )
    assert config == CSM_1B
    assert (
        config.backbone.num_layers,
        config.backbone.embed_dim,
        config.backbone.num_heads,
        config.backbone.num_kv_heads,
        config.backbone.intermediate_dim,
    ) == (16, 2048, 32, 8, 8192)
    assert (
        config.decoder.num_layers,
        config.decoder.embed_dim,
        config.decoder.num_heads,
        config.decoder.num_kv_heads,
        config.decoder.head_dim,
    ) == (4, 1024, 8, 2, 128)
    assert config.to_dict()["backbone_flavor"] == "llama-1B"


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "mimi.safetensors", "model.safetensors"])
def test_missing_files_are_named(tiny_model_dir: Path, tmp_path: Path, missing: str) -> None:
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*python -m export"):
        load_csm_1b(broken, device="cpu")


def test_wrong_shapes_and_keys_are_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = copy_without_weights(tiny_model_dir, tmp_path / "broken")
    state = dict(read_state_dict(tiny_model_dir / "model.safetensors"))
    state["projection.weight"] = torch.zeros(3, 3)
    del state["backbone.norm.scale"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"projection\.weight has shape \[3, 3\].*missing backbone\.norm\.scale.*unexpected extra\.weight"):
        load_csm_1b(broken, device="cpu")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"backbone_flavor": "llama-7B", "decoder_flavor": "llama-100M"}, "unknown backbone_flavor 'llama-7B'"),
        ({"decoder_flavor": "llama-100M"}, "give 'backbone_flavor' or an explicit 'backbone'"),
        (
            {"backbone": {"num_layers": 2}, "decoder_flavor": "llama-100M"},
            r"missing fields \['num_heads', 'num_kv_heads', 'embed_dim', 'intermediate_dim'\]",
        ),
        ({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "colour": "red"}, r"unknown fields \['colour'\]"),
        ({"backbone": dataclasses.asdict(FLAVORS["tiny-backbone"]) | {"num_heads": 3}, "decoder_flavor": "llama-100M"}, "must divide"),
    ],
)
def test_bad_configs_are_clear_errors(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(config)


def test_bad_config_json_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_csm_1b(broken, device="cpu")
