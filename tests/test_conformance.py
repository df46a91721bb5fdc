"""Our CSM against an independent implementation, transformers' port (`CsmForConditionalGeneration`,
see hf_reference.py), on identical weights: RoPE at every position, one backbone pass, and
greedy codes frame for frame, first through the model API, then through `load_csm_1b`.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.csm.modeling_csm import apply_rotary_pos_emb

from csm_triton import Segment
from csm_triton.model.checkpoint import read_state_dict
from csm_triton.model.config import TINY, ModelConfig
from csm_triton.model.model import CSM, apply_rope, rope_table
from hf_reference import build_hf_model, hf_forward, hf_generate, hf_inputs
from prompts import conformance_prompts, greedy_sampler, our_greedy

pytestmark = pytest.mark.engine

FRAMES = 8


def assert_same_frames(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"shapes {tuple(ours.shape)} vs HF {tuple(theirs.shape)}"
    same = (ours == theirs).all(dim=1)
    if not same.all():
        first = int((~same).nonzero()[0])
        raise AssertionError(
            f"frames equal: {same.tolist()}; first differing frame {first}: ours {ours[first].tolist()} vs HF {theirs[first].tolist()}"
        )


# --- our CSM(TINY) with random weights, through the model API ---------------------------------


@pytest.fixture(scope="module")
def random_pair() -> tuple[CSM, torch.nn.Module]:
    torch.manual_seed(1234)
    model = CSM(TINY)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".scale"):  # RMSNorm scales near 1, distinct so a swapped norm shows
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.02)
    model.eval()
    return model, build_hf_model(model.state_dict(), TINY)


@pytest.fixture(scope="module")
def prompts() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return conformance_prompts(TINY.text_vocab_size)


@pytest.mark.parametrize("part", ["backbone", "decoder"])
def test_rope_matches_hf(random_pair, part):
    """Our llama3-scaled frequencies == the port's, and our interleaved RoPE == its rotate-half RoPE
    on permuted channels at every position 0..max_seq_len-1."""
    _, hf = random_pair
    config = getattr(TINY, part)
    rotary = hf.backbone_model.rotary_emb if part == "backbone" else hf.depth_decoder.model.rotary_emb
    table = rope_table(config)  # [positions, head_dim / 2, (cos, sin)]
    frequencies = torch.atan2(table[1, :, 1], table[1, :, 0])  # the angle at position 1
    torch.testing.assert_close(frequencies, rotary.inv_freq, atol=0, rtol=1e-5)

    positions = torch.arange(config.max_seq_len)[None]
    x = torch.randn(1, config.max_seq_len, config.num_heads, config.head_dim, generator=torch.Generator().manual_seed(5))
    ours = apply_rope(x, table[positions])
    perm = torch.arange(config.head_dim).view(-1, 2).T.reshape(-1)  # rotate-half channel c is interleaved channel perm[c]
    cos, sin = rotary(x, positions)
    theirs, _ = apply_rotary_pos_emb(x[..., perm].transpose(1, 2), x[..., perm].transpose(1, 2), cos, sin)
    # The port computes angles in fp32 (~position * 1e-7 rad off, 2e-4 at most here); ours in fp64.
    torch.testing.assert_close(ours[..., perm].transpose(1, 2), theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("prompt", ["text", "audio"])
def test_prompt_embeddings_match_hf(random_pair, prompts, prompt):
    """HF, given our frames through hf_inputs (text ids, `<|AUDIO|>` codes, `<|audio_eos|>`), embeds
    exactly the positions our model embeds."""
    model, hf = random_pair
    tokens, mask = prompts[prompt]
    inputs = hf_inputs(hf, tokens, mask)
    with torch.inference_mode():
        model.setup_caches(1)
        ours = model.embed_frames(tokens[None], mask[None])
        merged = hf._merge_input_ids_with_input_values(inputs["input_ids"], inputs.get("input_values"), inputs.get("input_values_cutoffs"))
    theirs = merged["inputs_embeds"]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prompt", ["text", "audio"])
def test_backbone_forward_matches_hf(random_pair, prompts, prompt):
    model, hf = random_pair
    tokens, mask = prompts[prompt]
    ours_hidden, _ = our_greedy(model, tokens, mask, frames=0)
    with torch.inference_mode():
        ours_logits = model.codebook0_head(ours_hidden)
    hf_hidden, hf_logits = hf_forward(hf, tokens, mask)
    # Both agree to ~5e-7; leaving out llama3 RoPE scaling alone moves the hidden state by ~1e-4
    # (text prompt) and ~4e-3 (audio prompt, ~290 positions).
    torch.testing.assert_close(ours_hidden, hf_hidden, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours_logits, hf_logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("prompt", ["text", "audio"])
def test_depth_decoder_logits_match_hf(random_pair, prompts, prompt):
    """All 32 codebooks' logits of one greedy frame, ours (as handed to the sampler) vs the port's
    depth decoder run over the same [h, c0 .. c30] in one pass."""
    model, hf = random_pair
    tokens, mask = prompts[prompt]
    hidden, _ = our_greedy(model, tokens, mask, frames=0)
    logits = []
    sampler = greedy_sampler()

    def recording_sampler(codebook_logits: torch.Tensor, codebook: int) -> torch.Tensor:
        logits.append(codebook_logits[0].clone())
        return sampler(codebook_logits, codebook)

    with torch.inference_mode():
        codes = model.sample_frame(hidden[None], recording_sampler)  # [1, 32]
        decoder_inputs = torch.nn.functional.pad(codes[:, :-1], (1, 0))  # [1, 32]: h's placeholder, c0 .. c30
        theirs = hf.depth_decoder(input_ids=decoder_inputs, backbone_last_hidden_state=hidden[None]).logits[0]
        theirs = torch.cat([hf.lm_head(hidden)[None], theirs])  # [32, vocab]
    torch.testing.assert_close(torch.stack(logits), theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("prompt", ["text", "audio"])
def test_greedy_frames_match_hf(random_pair, prompts, prompt):
    model, hf = random_pair
    tokens, mask = prompts[prompt]
    _, ours = our_greedy(model, tokens, mask, FRAMES)
    assert_same_frames(ours, hf_generate(hf, tokens, mask, FRAMES))


# --- the staged tiny model, through load_csm_1b's Generator -----------------------------------


@pytest.fixture(scope="module")
def staged(tiny_model_dir, generator):
    """conftest's Generator (`load_csm_1b(tiny_model_dir, device="cpu")`) and the port on its weights."""
    config = ModelConfig.from_json(tiny_model_dir / "config.json")
    return generator, build_hf_model(read_state_dict(tiny_model_dir / "model.safetensors"), config)


def _check_generator(staged, text, speaker, context, audio_segments=0):
    """Greedy codes of the Generator == the port's, given the same prompt frames (`gen.prompt`)."""
    generator, hf = staged
    tokens, mask = generator.prompt(text, speaker, context)
    audio = mask[:, :-1].all(dim=1)
    # Each audio segment ends with one all-zero frame.
    assert int((audio & (tokens[:, :-1] == 0).all(dim=1)).sum()) == audio_segments
    if audio_segments:
        assert (tokens[audio, :-1] != 0).any(), "the context's audio encoded to all-zero codes: the test would not see them"
    ours = generator.generate_codes(text, speaker, context, temperature=0.9, topk=1, max_audio_length_ms=FRAMES * 80, seed=0)
    assert_same_frames(ours, hf_generate(hf, tokens, mask, FRAMES))


def test_generator_matches_hf_without_context(staged):
    _check_generator(staged, "Hello there, how are you?", 0, [])


def test_generator_matches_hf_with_text_context(staged):
    context = [
        Segment(text="Did you see the game last night?", speaker=0, is_audio=False),
        Segment(text="I did, what a finish.", speaker=1, is_audio=False),
    ]
    _check_generator(staged, "They never give up.", 0, context)


def test_generator_matches_hf_with_audio_context(staged):
    noise = torch.Generator().manual_seed(7)
    context = [
        Segment(speaker=1, text="hi", audio=0.1 * torch.randn(24_000, generator=noise)),
        Segment(speaker=0, text="hello, nice to meet you", audio=0.1 * torch.randn(12_000, generator=noise)),
    ]
    _check_generator(staged, "Nice to meet you too.", 1, context, audio_segments=2)
