"""The KV-cache memory budget: bytes a slot takes, checked against the caches `setup_caches`
allocates and against CSM-1B's published architecture, and `kv_cache_memory_mb` bounding the slots."""

from __future__ import annotations

import logging

import pytest
import torch

from csm_triton.model.config import CSM_1B, TINY
from csm_triton.model.model import CSM, kv_cache_bytes_per_slot, slots_within_budget
from csm_triton.triton.serving import ServingConfig

pytestmark = pytest.mark.unit

CSM_1B_SLOT_BYTES_BF16 = 67_239_936  # 64.125 MiB


def allocated_bytes(model: CSM) -> int:
    caches = [layer.attn.kv_cache for transformer in (model.backbone, model.decoder) for layer in transformer.layers]
    return sum(cache.k.nbytes + cache.v.nbytes for cache in caches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_slot_are_what_setup_caches_allocates(dtype: torch.dtype) -> None:
    model = CSM(TINY).to(dtype)
    model.setup_caches(3)
    assert allocated_bytes(model) == 3 * kv_cache_bytes_per_slot(TINY, dtype)


def test_csm_1b_takes_64_mib_a_slot_in_bfloat16() -> None:
    # layers x (k, v) x kv heads x positions x head dim x 2 bytes, from CSM_FACTS' architecture table
    backbone = 16 * 2 * 8 * 2048 * 64 * 2
    decoder = 4 * 2 * 2 * 32 * 128 * 2  # one frame: 32 positions
    assert backbone + decoder == CSM_1B_SLOT_BYTES_BF16
    assert kv_cache_bytes_per_slot(CSM_1B, torch.bfloat16) == CSM_1B_SLOT_BYTES_BF16
    assert kv_cache_bytes_per_slot(CSM_1B, torch.float32) == 2 * CSM_1B_SLOT_BYTES_BF16


def serving(**parameters: int) -> ServingConfig:
    return ServingConfig.from_parameters({key: {"string_value": str(value)} for key, value in parameters.items()})


@pytest.mark.parametrize(
    ("budget_mb", "slots", "expected"),
    [
        (0, 8, 8),  # no bound
        (300, 8, 4),  # 300 / 64.125 = 4.7
        (10_000, 8, 8),  # the budget holds more than asked for
        (65, 1, 1),
    ],
)
def test_the_budget_bounds_the_slots(budget_mb: int, slots: int, expected: int) -> None:
    assert slots_within_budget(slots, budget_mb, CSM_1B, torch.bfloat16) == expected


def test_the_bytes_a_slot_and_the_slots_chosen_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="csm_triton.model.model"):
        slots_within_budget(8, 300, CSM_1B, torch.bfloat16)
    assert f"{CSM_1B_SLOT_BYTES_BF16} bytes" in caplog.text and "; 4 slots" in caplog.text


def test_a_budget_below_one_slot_fails_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"^kv_cache_memory_mb: 64 MiB holds no slot; one slot's KV caches take 64.12 MiB"):
        slots_within_budget(8, 64, CSM_1B, torch.bfloat16)
    with pytest.raises(ValueError, match=r"^kv_cache_memory_mb: must be >= 0"):
        serving(kv_cache_memory_mb=-1)


def test_the_python_backends_own_parameter_is_left_to_it() -> None:
    assert serving(slots=2) == ServingConfig.from_parameters(
        {"slots": {"string_value": "2"}, "EXECUTION_ENV_PATH": {"string_value": "$$TRITON_MODEL_DIRECTORY/env"}}
    )
    with pytest.raises(ValueError, match="unknown keys"):
        ServingConfig.from_parameters({"execution_env_path": {"string_value": "env"}})
