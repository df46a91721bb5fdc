"""Prompts as the model sees them (frames of 32 codebooks and a text column), the conformance
prompts (text alone, and text with audio context), and greedy decoding through the model API:
what the conformance tests and the quantization fidelity measurements share."""

from __future__ import annotations

import torch

from csm_triton.model.model import CSM
from csm_triton.model.sampling import Sampler


def greedy_sampler(batch: int = 1) -> Sampler:
    # top-k 1 is argmax whatever the temperature and noise.
    return Sampler(
        temperature=torch.ones(batch),
        topk=torch.ones(batch, dtype=torch.long),
        seeds=torch.zeros(batch, dtype=torch.long),
        frames=torch.zeros(batch, dtype=torch.long),
        num_codebooks=32,
    )


def text_frames(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(ids), 33, dtype=torch.long)
    tokens[:, -1] = ids
    mask = torch.zeros(len(ids), 33, dtype=torch.bool)
    mask[:, -1] = True
    return tokens, mask


def audio_frames(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [frames, 32] and the all-zero end-of-audio frame."""
    tokens = torch.zeros(len(codes) + 1, 33, dtype=torch.long)
    tokens[:-1, :-1] = codes
    mask = torch.zeros(len(codes) + 1, 33, dtype=torch.bool)
    mask[:, :-1] = True
    return tokens, mask


def concat(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.inference_mode()
def our_greedy(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the prompt, then `frames` greedy frames: (prompt's last hidden state [D], codes [frames, 32])."""
    model.setup_caches(1)
    rows = torch.zeros(1, dtype=torch.long)
    length = tokens.shape[0]
    hidden = model.backbone_forward(tokens[None], mask[None], rows, torch.arange(length)[None], length)[:, -1]
    prompt_hidden = hidden[0].clone()
    frame_mask = torch.ones(1, 1, 33, dtype=torch.bool)
    frame_mask[..., -1] = False
    codes = []
    for _ in range(frames):
        frame = model.sample_frame(hidden, greedy_sampler())  # [1, 32]
        codes.append(frame[0])
        frame_tokens = torch.cat([frame, torch.zeros(1, 1, dtype=torch.long)], dim=1)[:, None]
        hidden = model.backbone_forward(frame_tokens, frame_mask, rows, torch.tensor([[length]]), length + 1)[:, -1]
        length += 1
    return prompt_hidden, torch.stack(codes) if codes else torch.zeros(0, 32, dtype=torch.long)


def conformance_prompts(text_vocab_size: int, seed: int = 99) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A text prompt, and one with two audio turns between text ones."""
    generator = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(0, text_vocab_size, (n,), generator=generator)  # noqa: E731
    codes = lambda n: torch.randint(1, 2048, (n, 32), generator=generator)  # noqa: E731
    return {
        "text": text_frames(words(12)),
        # Long enough (~290 positions) that RoPE's low frequencies, which llama3 scaling divides by 32, turn.
        "audio": concat(
            text_frames(words(20)), audio_frames(codes(150)), text_frames(words(9)), audio_frames(codes(90)), text_frames(words(15))
        ),
    }
