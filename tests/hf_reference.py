"""transformers' CSM port (`CsmForConditionalGeneration`) built from our weights: the independent
implementation the conformance tests compare against.

Our checkpoints use Sesame's original (torchtune) key names and torchtune's interleaved RoPE
layout; the port renames every module and rotates q/k by halves, so q/k projection rows are
permuted per head. The port's Mimi codec is replaced by `_CodesCodec`, which hands back given
codes, so HF splices audio frames into the prompt with its own code (`<|AUDIO|>` placeholders,
`<|audio_eos|>` frames) without running a codec.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import CsmConfig, CsmDepthDecoderConfig, CsmForConditionalGeneration
from transformers.utils import logging as hf_logging

from csm_triton.model.config import ModelConfig, TransformerConfig

AUDIO_TOKEN = 128002  # `<|AUDIO|>`: a prompt position filled with one frame of audio codes
AUDIO_EOS_TOKEN = 128003  # `<|audio_eos|>`: the all-zero frame that ends an audio segment

# torchtune's Llama3ScaledRoPE defaults, as CSM was trained (the port rewrites them to equivalent
# numbers; transformers warns that 8192 exceeds max_position_embeddings and works).
ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _transformer_fields(config: TransformerConfig) -> dict:
    return dict(
        hidden_size=config.embed_dim,
        intermediate_size=config.intermediate_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_base,
        rope_scaling={**ROPE_SCALING, "factor": config.scale_factor},
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def hf_config(config: ModelConfig) -> CsmConfig:
    decoder = CsmDepthDecoderConfig(
        num_codebooks=config.audio_num_codebooks,
        backbone_hidden_size=config.backbone.embed_dim,
        vocab_size=config.audio_vocab_size,
        **_transformer_fields(config.decoder),
    )
    return CsmConfig(
        num_codebooks=config.audio_num_codebooks,
        vocab_size=config.audio_vocab_size,
        text_vocab_size=config.text_vocab_size,
        tie_codebooks_embeddings=True,
        depth_decoder_config=decoder.to_dict(),
        **_transformer_fields(config.backbone),
    )


def _rotate_half_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k projection rows [heads * head_dim, in] from torchtune's interleaved pairs (2i, 2i+1)
    to the rotate-half layout (i, i + head_dim/2)."""
    out_features, in_features = weight.shape
    heads = out_features // head_dim
    return weight.reshape(heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def convert_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our (Sesame/torchtune) key names -> the transformers port's, fp32."""
    state = {name: tensor.float() for name, tensor in state.items()}
    out = {
        "embed_text_tokens.weight": state.pop("text_embeddings.weight"),
        "lm_head.weight": state.pop("codebook0_head.weight"),
        "depth_decoder.model.inputs_embeds_projector.weight": state.pop("projection.weight"),
        "depth_decoder.codebooks_head.weight": state.pop("audio_head"),
    }
    audio = state.pop("audio_embeddings.weight")
    # The port embeds codebook k of token t at row t + k * vocab in both models (offsets added in
    # CsmBackboneModelEmbeddings and in CsmDepthDecoderModel), the same rows as ours; the two
    # tables are tied.
    out["backbone_model.embed_tokens.embed_audio_tokens.weight"] = audio
    out["depth_decoder.model.embed_tokens.weight"] = audio
    renames = {
        "attn.q_proj.weight": "self_attn.q_proj.weight",
        "attn.k_proj.weight": "self_attn.k_proj.weight",
        "attn.v_proj.weight": "self_attn.v_proj.weight",
        "attn.output_proj.weight": "self_attn.o_proj.weight",
        "mlp.w1.weight": "mlp.gate_proj.weight",
        "mlp.w2.weight": "mlp.down_proj.weight",
        "mlp.w3.weight": "mlp.up_proj.weight",
        "sa_norm.scale": "input_layernorm.weight",
        "mlp_norm.scale": "post_attention_layernorm.weight",
    }
    for ours, prefix, part in (("backbone", "backbone_model", config.backbone), ("decoder", "depth_decoder.model", config.decoder)):
        out[f"{prefix}.norm.weight"] = state.pop(f"{ours}.norm.scale")
        for layer in range(part.num_layers):
            for old, new in renames.items():
                tensor = state.pop(f"{ours}.layers.{layer}.{old}")
                if old.startswith(("attn.q_proj", "attn.k_proj")):
                    tensor = _rotate_half_rows(tensor, part.head_dim)
                out[f"{prefix}.layers.{layer}.{new}"] = tensor
    if state:
        raise ValueError(f"unconverted weights: {sorted(state)}")
    return out


class _CodesCodec(nn.Module):
    """Stands in for the port's Mimi: "encodes" one sample per frame, where the sample's value is
    the index of an audio segment whose codes [frames, 32] were given. Enough for HF's own
    `_merge_input_ids_with_input_values` to splice those frames at the `<|AUDIO|>` positions."""

    def __init__(self) -> None:
        super().__init__()
        self.segments: list[torch.Tensor] = []

    def encode(self, audio: torch.Tensor) -> SimpleNamespace:  # audio: [1, 1, frames]
        codes = self.segments[int(audio[0, 0, 0])]
        if audio.shape[-1] != codes.shape[0] or not (audio == audio[0, 0, 0]).all():
            raise ValueError("audio placeholder does not match its segment")
        return SimpleNamespace(audio_codes=codes.T.unsqueeze(0))  # [1, 32, frames]

    def get_audio_codes_mask(self, padding_mask: torch.Tensor) -> torch.Tensor:
        lengths = padding_mask.sum(dim=-1)  # one sample per frame
        return torch.arange(int(lengths.max()), device=padding_mask.device)[None, :] < lengths[:, None]


def build_hf_model(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> CsmForConditionalGeneration:
    """`CsmForConditionalGeneration` in fp32 eval mode holding exactly the given weights (every
    parameter set from them, none left at its initial value)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the 8192-vs-max_position_embeddings RoPE warning
    try:
        model = CsmForConditionalGeneration(hf_config(config))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.codec_model = _CodesCodec()
    weights = convert_state_dict(state_dict, config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"HF weights: missing {missing}, unexpected {unexpected}, mis-shaped {wrong}")
    model.load_state_dict(weights, strict=True)
    for name, tensor in model.state_dict().items():
        if not torch.equal(tensor, weights[name]):
            raise ValueError(f"HF weight {name} was not set from the checkpoint")
    return model.float().eval()


def hf_inputs(model: CsmForConditionalGeneration, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our 33-column prompt frames (tokens, mask: [T, 33]) as the port's inputs: text positions as
    text token ids; audio positions as `<|AUDIO|>` placeholders whose codes HF splices in itself,
    except the all-zero frame closing each audio run, which is `<|audio_eos|>`. Every position
    is attended (the port's pad_token_id is also `<|AUDIO|>`, so no mask would hide the audio)."""
    num_codebooks = tokens.shape[1] - 1
    is_text = mask[:, -1] & ~mask[:, :-1].any(dim=1)
    is_audio = mask[:, :-1].all(dim=1) & ~mask[:, -1]
    if not (is_text | is_audio).all():
        raise ValueError("every prompt frame must be text-only or a full audio frame")
    ids = torch.where(is_text, tokens[:, -1], torch.full_like(tokens[:, -1], AUDIO_TOKEN))
    codec: _CodesCodec = model.codec_model
    codec.segments = []
    samples = []
    start = None
    for position in range(tokens.shape[0] + 1):
        if position < tokens.shape[0] and is_audio[position]:
            start = position if start is None else start
            continue
        if start is not None:
            end = position
            if (tokens[end - 1, :num_codebooks] == 0).all():
                ids[end - 1] = AUDIO_EOS_TOKEN
                end -= 1
            if end == start:
                raise ValueError(f"audio at prompt position {start} has no frame before its end-of-audio frame")
            samples.append(torch.full((end - start,), float(len(codec.segments))))
            codec.segments.append(tokens[start:end, :num_codebooks].clone())
            start = None
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    if samples:
        inputs["input_values"] = torch.cat(samples)[None, None]  # [1, 1, audio frames]
        inputs["input_values_cutoffs"] = torch.tensor([[len(s) for s in samples]]).cumsum(dim=1)
    return inputs


@torch.inference_mode()
def hf_forward(model: CsmForConditionalGeneration, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone pass over the prompt: (last position's normed hidden state [D], codebook-0 logits [vocab])."""
    out = model(**hf_inputs(model, tokens, mask), output_hidden_states=True)
    return out.hidden_states[-1][0, -1], out.logits[0, -1]


@torch.inference_mode()
def hf_generate(model: CsmForConditionalGeneration, tokens: torch.Tensor, mask: torch.Tensor, frames: int) -> torch.Tensor:
    """The port's greedy generation from our prompt frames: codes [frames, 32]."""
    codes = model.generate(
        **hf_inputs(model, tokens, mask),
        max_new_tokens=frames,
        do_sample=False,
        depth_decoder_do_sample=False,
    )
    codes = codes[0]
    if codes.shape[0] != frames:
        # The port stops early on a frame whose codebooks 0..30 are all 0.
        raise AssertionError(f"HF generated {codes.shape[0]} frames, expected {frames}: {codes.tolist()}")
    return codes
