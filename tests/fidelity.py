"""How closely one CSM follows another on the same prompts: teacher-forced logits of every codebook
(cosine similarity, KL divergence, top-1 agreement) and free-running greedy codes frame by frame.
A quantized model is measured against the unquantized one on identical weights (bench/fidelity.py,
tests/test_quantize.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csm_triton.model.model import CSM
from prompts import our_greedy


@torch.inference_mode()
def teacher_forced_logits(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The logits [frames, 32, vocab] of every codebook when every earlier code is `codes`' own: the
    backbone over the prompt and codes[:-1] in one pass, then the depth decoder over each frame's
    [h, c0 .. c30] in one pass."""
    model.setup_caches(1)
    frames = len(codes)
    frame_tokens = torch.cat([codes, torch.zeros(frames, 1, dtype=torch.long)], dim=1)
    frame_mask = torch.ones_like(frame_tokens, dtype=torch.bool)
    frame_mask[:, -1] = False
    inputs, input_mask = torch.cat([tokens, frame_tokens[:-1]]), torch.cat([mask, frame_mask[:-1]])
    length = len(inputs)
    hidden = model.backbone_forward(inputs[None], input_mask[None], 1, torch.arange(length)[None], length)[0]
    hidden = hidden[len(tokens) - 1 :]  # the states that predict frames 0 .. frames-1
    positions = torch.arange(model.config.audio_num_codebooks)[None]
    logits = []
    for state, frame in zip(hidden, codes, strict=True):
        embeds = model.audio_embeddings(frame[:-1] + model.codebook_offsets[:-1])  # codebooks 0..30
        decoder_input = model.projection(torch.cat([state[None], embeds])[None])
        decoded = model.decoder(decoder_input, 1, positions, model.config.audio_num_codebooks)[0]
        rest = torch.einsum("cd,cdv->cv", decoded[1:].to(model.audio_head.dtype), model.audio_head)
        logits.append(torch.cat([model.codebook0_head(state[None]).float(), rest.float()]))
    return torch.stack(logits)


@dataclass
class Fidelity:
    """Per codebook [32], over every frame of every prompt: the logits' mean and worst cosine
    similarity, mean KL(reference || candidate) in nats, and top-1 agreement; and per prompt, the
    greedy frames the candidate generates identical to the reference's before the first difference."""

    cosine_mean: torch.Tensor
    cosine_min: torch.Tensor
    kl_mean: torch.Tensor
    top1: torch.Tensor
    greedy_frames_equal: dict[str, int]
    frames: int

    def summary(self) -> dict:
        return {
            "cosine_mean": round(float(self.cosine_mean.mean()), 6),
            "cosine_min": round(float(self.cosine_min.min()), 6),
            "kl_mean": float(self.kl_mean.mean()),
            "kl_worst_codebook": float(self.kl_mean.max()),
            "top1_mean": round(float(self.top1.mean()), 4),
            "top1_worst_codebook": round(float(self.top1.min()), 4),
            "greedy_frames_equal": self.greedy_frames_equal,
            "frames": self.frames,
            "per_codebook": {
                "cosine_mean": [round(v, 6) for v in self.cosine_mean.tolist()],
                "kl_mean": [float(f"{v:.3g}") for v in self.kl_mean.tolist()],
                "top1": [round(v, 3) for v in self.top1.tolist()],
            },
        }


def measure(reference: CSM, candidate: CSM, prompts: dict[str, tuple[torch.Tensor, torch.Tensor]], frames: int) -> Fidelity:
    """The candidate against the reference, teacher-forced on the reference's greedy codes of each
    prompt, and free-running greedy for `frames` frames."""
    cosines, kls, agreements, greedy_equal = [], [], [], {}
    for name, (tokens, mask) in prompts.items():
        _, codes = our_greedy(reference, tokens, mask, frames)
        _, candidate_codes = our_greedy(candidate, tokens, mask, frames)
        differing = (codes != candidate_codes).any(dim=1).nonzero()
        greedy_equal[name] = int(differing[0]) if len(differing) else frames
        expected = teacher_forced_logits(reference, tokens, mask, codes)  # [frames, 32, vocab]
        got = teacher_forced_logits(candidate, tokens, mask, codes)
        cosines.append(F.cosine_similarity(expected, got, dim=-1))
        expected_log = expected.log_softmax(-1)
        kls.append((expected_log.exp() * (expected_log - got.log_softmax(-1))).sum(-1))
        agreements.append((expected.argmax(-1) == got.argmax(-1)).float())
    cosine, kl, top1 = (torch.cat(values) for values in (cosines, kls, agreements))  # [frames x prompts, 32]
    return Fidelity(cosine.mean(0), cosine.amin(0), kl.mean(0), top1.mean(0), greedy_equal, frames)
