"""csm-say: speak a line with a CSM Triton server and write it to a WAV file.

  csm-say "Nice to meet you." --speaker 1 \\
      --context-text "Hello, how are you?" 0 --context earlier.wav "I'm fine, thanks." 1 -o reply.wav

Context segments are given in conversation order, the flags interleaved as on the command line.
--context-codes gives a turn as the Mimi codes the server returned for it (a .npy file of
[frames, 32] integers, e.g. np.save of CSMClient.generate_codes), which the server uses as they are.
With --stream (gRPC) the WAV is written chunk by chunk as the audio arrives, and the time to the
first audio and the real-time factor (wall time / audio duration) are reported.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import soundfile

from .client import DEFAULT_STREAM_MODEL, CSMClient, CSMError
from .contract import FRAME_MS, INPUTS, SAMPLE_RATE
from .segment import Segment


class AppendSegment(argparse.Action):
    """Appends (kind, values) to one shared list, so --context and --context-text keep their
    command-line order. `const` is the kind: "audio", "codes" or "text"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option_string=None) -> None:
        speaker = values[-1]
        if not speaker.isdigit():
            parser.error(f"{option_string}: SPEAKER must be an integer >= 0, got {speaker!r}")
        segments = list(getattr(namespace, self.dest) or [])
        segments.append((self.const, [*values[:-1], int(speaker)]))
        setattr(namespace, self.dest, segments)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csm-say", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", help="what to say")
    parser.add_argument("--speaker", type=int, default=0, help="speaker id (default 0)")
    parser.add_argument(
        "--context", dest="segments", nargs=3, metavar=("WAV", "TEXT", "SPEAKER"), action=AppendSegment, const="audio",
        help="an earlier turn with its audio (a mono WAV); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--context-text", dest="segments", nargs=2, metavar=("TEXT", "SPEAKER"), action=AppendSegment, const="text",
        help="an earlier turn as text only; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--context-codes", dest="segments", nargs=3, metavar=("NPY", "TEXT", "SPEAKER"), action=AppendSegment, const="codes",
        help="an earlier turn with the Mimi codes the server returned for it ([frames, 32] in a .npy file); repeatable",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, help=f"sampling temperature (server default {INPUTS['TEMPERATURE'].default})")
    parser.add_argument("--topk", type=int, help=f"top-k sampling (server default {INPUTS['TOPK'].default})")
    parser.add_argument(
        "--max-ms", type=int, help=f"longest audio to generate, in ms (server default {INPUTS['MAX_AUDIO_LENGTH_MS'].default})"
    )
    parser.add_argument("--seed", type=int, help="sampling seed, for repeatable output")
    parser.add_argument("--url", help="server address (default localhost:8001 for gRPC, localhost:8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model-name", default="csm")
    parser.add_argument("--stream", action="store_true", help="write the WAV as the audio arrives, and report latency (gRPC only)")
    parser.add_argument(
        "--first-chunk-frames",
        type=int,
        help=f"with --stream: frames of {FRAME_MS} ms in the first chunk (server default {INPUTS['FIRST_CHUNK_FRAMES'].default})",
    )
    parser.add_argument(
        "--chunk-frames",
        type=int,
        help=f"with --stream: frames of {FRAME_MS} ms in each later chunk "
        f"(server default: adaptive, up to {INPUTS['CHUNK_FRAMES'].default})",
    )
    parser.add_argument("--stream-model-name", default=DEFAULT_STREAM_MODEL)
    parser.add_argument("-o", "--output", type=Path, required=True, help="WAV file to write")
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests")
    args = parser.parse_args(argv)
    if not args.stream and (args.first_chunk_frames is not None or args.chunk_frames is not None):
        parser.error("--first-chunk-frames and --chunk-frames need --stream")
    return args


def read_segment(kind: str, values: list) -> Segment:
    if kind == "text":
        text, speaker = values
        return Segment(speaker=speaker, text=text)
    path, text, speaker = values
    if kind == "codes":
        try:
            codes = numpy.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"--context-codes {path}: cannot read it as a .npy array ({error})") from error
        return Segment(speaker=speaker, text=text, codes=codes)
    try:
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)  # [samples, channels]
    except (OSError, soundfile.LibsndfileError) as error:
        raise ValueError(f"--context {path}: cannot read it as audio ({error})") from error
    if audio.shape[1] != 1:
        raise ValueError(f"--context {path}: has {audio.shape[1]} channels; context audio must be mono (mix it down first)")
    return Segment(speaker=speaker, text=text, audio=audio[:, 0], sample_rate=sample_rate)


def stream_to_wav(client: CSMClient, args: argparse.Namespace, context: list[Segment], **options: Any) -> None:
    """Write each chunk as it arrives (and flush it), so that the file can be played while the
    server still speaks; print the time to the first audio and the real-time factor."""
    start = time.perf_counter()
    chunks = client.stream(
        args.text, args.speaker, context, first_chunk_frames=args.first_chunk_frames, chunk_frames=args.chunk_frames, **options
    )
    first = next(chunks, None)  # an invalid request fails here, before the file is created
    if first is not None:
        print(f"time to first audio: {time.perf_counter() - start:.3f} s", flush=True)
    samples = 0
    with soundfile.SoundFile(args.output, "w", SAMPLE_RATE, channels=1) as wav:
        for chunk in itertools.chain([] if first is None else [first], chunks):
            wav.write(chunk)
            wav.flush()
            samples += len(chunk)
    wall_s, audio_s = time.perf_counter() - start, samples / SAMPLE_RATE
    factor = f"{wall_s / audio_s:.2f}" if samples else "n/a"
    print(f"real-time factor: {factor} ({wall_s:.2f} s to make {audio_s:.2f} s of audio)")
    print(f"wrote {args.output}: {audio_s:.2f} s of audio at {SAMPLE_RATE} Hz")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = {"temperature": args.temperature, "topk": args.topk, "max_audio_length_ms": args.max_ms, "seed": args.seed}
    try:
        context = [read_segment(kind, values) for kind, values in args.segments or []]
        with CSMClient(args.url, args.protocol, args.model_name, stream_model_name=args.stream_model_name) as client:
            if args.stream:
                stream_to_wav(client, args, context, **options)
                return
            audio, sample_rate = client.generate(args.text, args.speaker, context, **options)
    except (CSMError, ValueError, RuntimeError) as error:
        print(f"csm-say: error: {error}", file=sys.stderr)
        sys.exit(1)
    soundfile.write(args.output, audio, sample_rate)
    print(f"wrote {args.output}: {len(audio) / sample_rate:.2f} s of audio at {sample_rate} Hz")


if __name__ == "__main__":
    main()
