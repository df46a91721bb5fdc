"""The design document's `Generator` interface, served by a Triton server. Code written for
`load_csm_1b` runs against a server by changing one line:

    generator = RemoteGenerator("localhost:8001")   # instead of load_csm_1b("ckpt.pt", "cuda")
    audio = generator.generate(text="Hello from Sesame.", speaker=0, context=[])
    torchaudio.save("audio.wav", audio.unsqueeze(0).cpu(), generator.sample_rate)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .client import DEFAULT_STREAM_MODEL, DEFAULT_TIMEOUT_S, CSMClient
from .contract import INPUTS, SAMPLE_RATE

if TYPE_CHECKING:
    import torch


class RemoteGenerator:
    """`generate` / `generate_codes` / `generate_streaming` with the design document's signature and defaults,
    returning torch tensors like the in-process Generator. torch is imported on first use, so
    the rest of the client works without it."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model_name: str = "csm",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        stream_model_name: str = DEFAULT_STREAM_MODEL,
    ) -> None:
        self.client = CSMClient(url, protocol, model_name, timeout_s, stream_model_name)

    def generate(
        self,
        text: str,
        speaker: int,
        context: Sequence[Any],
        temperature: float = INPUTS["TEMPERATURE"].default,
        topk: int = INPUTS["TOPK"].default,
        max_audio_length_ms: int = INPUTS["MAX_AUDIO_LENGTH_MS"].default,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Speak `text` as `speaker` after `context`: mono float32 audio [samples] at 24 kHz."""
        import torch

        audio, _ = self.client.generate(
            text, speaker, context, temperature=temperature, topk=topk, max_audio_length_ms=max_audio_length_ms, seed=seed
        )
        return torch.from_numpy(audio)

    def generate_codes(
        self,
        text: str,
        speaker: int,
        context: Sequence[Any],
        temperature: float = INPUTS["TEMPERATURE"].default,
        topk: int = INPUTS["TOPK"].default,
        max_audio_length_ms: int = INPUTS["MAX_AUDIO_LENGTH_MS"].default,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The sampled Mimi codes [frames, 32] (int64, as in process)."""
        import torch

        return torch.from_numpy(
            self.client.generate_codes(
                text, speaker, context, temperature=temperature, topk=topk, max_audio_length_ms=max_audio_length_ms, seed=seed
            )
        ).long()

    def generate_streaming(
        self,
        text: str,
        speaker: int,
        context: Sequence[Any],
        temperature: float = INPUTS["TEMPERATURE"].default,
        topk: int = INPUTS["TOPK"].default,
        max_audio_length_ms: int = INPUTS["MAX_AUDIO_LENGTH_MS"].default,
        seed: int | None = None,
        first_chunk_frames: int | None = None,
        chunk_frames: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Audio chunks [samples] as they are generated (gRPC); joined, they are `generate`'s audio.
        Chunk sizes (frames of 80 ms) left as None take the server's configured defaults. Closing
        the iterator early cancels the generation on the server."""
        import torch

        chunks = self.client.stream(
            text, speaker, context, first_chunk_frames=first_chunk_frames, chunk_frames=chunk_frames,
            temperature=temperature, topk=topk, max_audio_length_ms=max_audio_length_ms, seed=seed,
        )  # fmt: skip
        # Closing this generator drops the last reference to `chunks`, which closes it: the request is cancelled.
        return (torch.from_numpy(chunk) for chunk in chunks)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemoteGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
